"""Retry a request whose database connection was lost mid-way (a backend terminated, a failover),
or whose transaction PostgreSQL chose as a deadlock or serialization victim.

PostgreSQL can end a backend at any time (``pg_terminate_backend``, a restart, a failover). The psycopg
pool's health check keeps dead connections from being handed out, but a connection that dies *during*
a request raises ``OperationalError`` in the middle of the view and would answer 500. This middleware,
the innermost one, runs the view again (at most ``MAX_RETRIES`` times) on a fresh pooled connection
when the connection it used is no longer usable.

Why a retry is safe: a lost connection means PostgreSQL rolled back the open transaction, so nothing
of the first attempt was written; and node tasks are sent only ``on_commit``, which a rolled-back
transaction never reaches. The one ambiguous case is a connection lost while COMMIT itself was in
flight: the retry then meets the committed state and answers as for a repeated request (a VM name
taken -> 400, an action already pending -> 202), never a duplicate. Errors on a healthy connection
(a constraint, a lock timeout) are not retried.
"""

import io
import logging
from collections.abc import Callable
from typing import Any

import psycopg
import psycopg_pool
from django.db import DatabaseError, OperationalError, connection
from django.http import HttpRequest, HttpResponse

logger = logging.getLogger(__name__)

MAX_RETRIES = 3
# Bodies up to this size are kept in memory so a retry can parse them again (larger ones: no retry).
RETRY_BODY_MAX = 2 * 1024 * 1024


class RetryOnLostConnectionMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)

    def process_view(
        self, request: HttpRequest, view: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        length = int(request.META.get("CONTENT_LENGTH") or 0)
        if 0 < length <= RETRY_BODY_MAX:
            try:
                request.body  # noqa: B018 - read once and keep, so a retry can parse it again
            except Exception:  # the view reports a bad body itself
                return
        request._novacron_view = (view, args, kwargs)  # type: ignore[attr-defined]

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        saved = getattr(request, "_novacron_view", None)
        if saved is None or not lost_connection(exception):
            return None
        view, args, kwargs = saved
        for attempt in range(1, MAX_RETRIES + 1):
            logger.warning(
                "%s %s: database connection lost (%s); retrying (%d/%d)",
                request.method,
                request.path,
                str(exception).splitlines()[0] if str(exception) else type(exception).__name__,
                attempt,
                MAX_RETRIES,
            )
            connection.close()  # back to the pool, which discards it; the retry checks out a healthy one
            body = getattr(request, "_body", None)
            if body is not None:
                request._stream = io.BytesIO(body)
                request._read_started = False  # type: ignore[attr-defined]
            try:
                response: HttpResponse = view(request, *args, **kwargs)
            except DatabaseError as again:
                if attempt == MAX_RETRIES or not lost_connection(again):
                    raise
                exception = again
                continue
            return response
        return None


def lost_connection(exception: Exception) -> bool:
    """Whether ``exception`` says the connection went away (not that a statement failed on it).

    Judged from the driver's error, not from the connection's state: by the time a middleware sees
    the exception, the failed transaction's rollback has dropped the dead connection and something
    else (authentication, logging) may already have checked out a fresh one.
    """
    if not isinstance(exception, OperationalError) or connection.in_atomic_block:
        return False
    cause = exception.__cause__
    if isinstance(cause, psycopg.errors.DeadlockDetected | psycopg.errors.SerializationFailure):
        return True  # PostgreSQL rolled the transaction back: running it again is the standard answer
    if isinstance(cause, psycopg_pool.PoolTimeout):
        return True
    if not isinstance(cause, psycopg.OperationalError):
        return False
    sqlstate = cause.sqlstate
    # None: the socket died (no server message); 08: connection exception; 57P: the server shut the
    # backend down (pg_terminate_backend, restart, failover).
    return sqlstate is None or sqlstate.startswith(("08", "57P"))
