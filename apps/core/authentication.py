"""Token authentication in one fixed SQL query (a prepared statement), without the ORM's per-request compile.

Every API request authenticates, so DRF's ``TokenAuthentication`` look-up
(``Token.objects.select_related("user").get(key=...)``) is on every path, the cached ones included;
building that query through the ORM costs more CPU than running it. This class runs the same join
as a fixed SQL string and builds the user and token with ``Model.from_db``: same answers (the user,
401 "Invalid token." or "User inactive or deleted."), no caching, so a revoked token or a
deactivated user is refused on the next request as before.

A successful look-up is also remembered in Redis (:func:`remember_token`) for the VM read fast path
(``apps/vms/middleware.py``), which answers cached reads without this query. That entry is removed
when the token is deleted and when its user is saved or deleted (``apps/core/signals.py``), and it
expires after ``TOKEN_MEMO_TTL`` seconds in any case (bounding a change made around the ORM's
signals, such as ``QuerySet.update``). Only a digest of the key is stored, never the key.
"""

import hashlib
import logging
import time
from functools import cache
from typing import Any, Final

import redis
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.db import connection
from django_redis import get_redis_connection
from rest_framework import exceptions
from rest_framework.authentication import TokenAuthentication
from rest_framework.authtoken.models import Token
from rest_framework.request import Request

from apps.core.context import Caller, request_context
from apps.core.db import columns, fetch_prepared, text_agg

logger = logging.getLogger(__name__)

TOKEN_MEMO_TTL: Final = 60  # seconds a remembered token answers without the database
# A process writes a token's memo at most once per this interval (not on every request it serves),
# and remembers at most this many tokens' write times before starting over.
TOKEN_MEMO_REFRESH: Final = TOKEN_MEMO_TTL / 2
TOKEN_MEMO_LOCAL_MAX: Final = 10_000
_memo_written: dict[tuple[str, Caller], float] = {}


def token_memo_key(key: str) -> str:
    """Redis key of a token's memo: a digest of the token, so Redis never holds the secret."""
    digest = hashlib.blake2b(key.encode(), digest_size=16).hexdigest()
    return f"{settings.CACHE_KEY_PREFIX}:authtoken:{digest}"


def remember_token(key: str, caller: Caller) -> None:
    """Store the :class:`Caller` of an active user's token as a Redis hash (best effort): the user,
    their personal project and their roles.

    Skipped when this process wrote the same less than ``TOKEN_MEMO_REFRESH`` ago: if it was
    removed since, the fast path only misses (and this slower path answers) until the next write.
    """
    now = time.monotonic()
    local = (key, caller)
    if now - _memo_written.get(local, -TOKEN_MEMO_REFRESH) < TOKEN_MEMO_REFRESH:
        return
    if len(_memo_written) >= TOKEN_MEMO_LOCAL_MAX:
        _memo_written.clear()
    memo_key = token_memo_key(key)
    try:
        pipe = get_redis_connection("default").pipeline(transaction=True)
        pipe.delete(memo_key)
        pipe.hset(memo_key, mapping=caller.as_memo())
        pipe.expire(memo_key, TOKEN_MEMO_TTL)
        pipe.execute()
    except redis.RedisError as exc:
        logger.debug("token memo not stored: %s", exc)
        return
    _memo_written[local] = now


def forget_tokens(keys: list[str]) -> None:
    """Drop the memos of ``keys`` (a token deleted, its user changed); failures are logged."""
    if not keys:
        return
    _memo_written.clear()  # this process writes the memos again on their next authentication
    try:
        get_redis_connection("default").delete(*(token_memo_key(key) for key in keys))
    except redis.RedisError as exc:
        # The memo still expires within TOKEN_MEMO_TTL; say so, since a revocation is waiting on it.
        logger.warning("token memo not removed (expires within %d s): %s", TOKEN_MEMO_TTL, exc)


def forget_user(user_id: int) -> None:
    """Drop the memos of every token of a user (their rights changed: staff flag, memberships)."""
    forget_tokens(list(Token.objects.filter(user_id=user_id).values_list("key", flat=True)))


def _columns(model: Any) -> dict[str, str]:
    """``attname -> column`` of a model's concrete fields (``user_id -> user_id``)."""
    return {field.attname: str(field.column) for field in model._meta.concrete_fields}


@cache
def _lookup_sql() -> tuple[str, list[str], list[str]]:
    """The join of token and user, with the user's personal project (its id, or NULL before it is
    made) and memberships (``<project id>:<role>`` joined by ``,``), and the field names of the
    first two (built once per process)."""
    # Imported here: the projects' modules import apps.core.errors, whose import of DRF's views
    # loads this module (DRF's authentication classes setting).
    from apps.projects.models import Membership, Project  # noqa: PLC0415

    quote = connection.ops.quote_name
    user_model = get_user_model()
    token_columns, user_columns = _columns(Token), _columns(user_model)
    project, member = _columns(Project), _columns(Membership)
    user_id = f"u.{quote(user_columns['id'])}"
    roles = text_agg(f"m.{quote(member['project_id'])} || ':' || m.{quote(member['role'])}", ",")
    # Identifiers only, from the models' metadata, quoted; the key is a query parameter.
    sql = (
        f"SELECT {columns(Token, 't')}, {columns(user_model, 'u')}, "  # noqa: S608
        f"(SELECT p.{quote(project['id'])} FROM {quote(Project._meta.db_table)} p "
        f"WHERE p.{quote(project['personal_of_id'])} = {user_id}), "
        f"(SELECT {roles} "
        f"FROM {quote(Membership._meta.db_table)} m WHERE m.{quote(member['user_id'])} = {user_id}) "
        f"FROM {quote(Token._meta.db_table)} t "
        f"JOIN {quote(user_model._meta.db_table)} u ON {user_id} = t.{quote(token_columns['user_id'])} "
        f"WHERE t.{quote(token_columns['key'])} = %s"
    )
    return sql, list(token_columns), list(user_columns)


def _caller(user: AbstractBaseUser, personal_project: int | None, memberships: str | None) -> Caller:
    """The caller of the token query's row; a user without a personal project gets it made here."""
    if personal_project is None:
        from apps.projects.acting import caller_of  # noqa: PLC0415 - see _lookup_sql

        return caller_of(user)
    pairs = (item.split(":") for item in memberships.split(",")) if memberships else ()
    roles = tuple(sorted((int(project), role) for project, role in pairs))
    return Caller(user.pk, bool(getattr(user, "is_staff", False)), personal_project, roles)


class FastTokenAuthentication(TokenAuthentication):
    """``Authorization: Token <key>`` as DRF does it, with one fixed SQL query, which also reads the
    caller's projects (into the request's context: where the request may act)."""

    caller: Caller | None = None  # of the last authenticate_credentials (DRF makes one instance per request)

    def authenticate(self, request: Request) -> tuple[AbstractBaseUser, Any] | None:
        found = super().authenticate(request)
        if found is not None:
            request_context(request).caller = self.caller
        return found

    def authenticate_credentials(self, key: str) -> tuple[AbstractBaseUser, Any]:
        sql, token_fields, user_fields = _lookup_sql()
        found = fetch_prepared(sql, [key])
        if not found:
            raise exceptions.AuthenticationFailed("Invalid token.")
        row = found[0]
        token = Token.from_db(connection.alias, token_fields, row[: len(token_fields)])
        user = get_user_model().from_db(connection.alias, user_fields, row[len(token_fields) : -2])
        if not user.is_active:
            raise exceptions.AuthenticationFailed("User inactive or deleted.")
        token.user = user
        self.caller = _caller(user, *row[-2:])
        remember_token(key, self.caller)
        return user, token
