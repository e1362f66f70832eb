"""Request monitoring: request ids, Prometheus observations and API logs without a database write.

For every request the middleware times the response, counts database queries and cache look-ups
(through :mod:`.instruments`), and labels everything by the *route pattern* (``/api/v1/vms/{pk}/``)
so that label values stay few. API requests (``/api/...``) are also logged: one Lua call to Redis
pushes entries onto a bounded list (or counts drops when the list is full) and bumps the counters
the control-plane sampler reads. The control worker writes the list to the database in bulk
(``services.api_logs_flush``).

The entries of a process travel in batches: a request adds its entry and counters to a buffer, and a
thread of the process pushes the buffer every ``API_LOG_PUSH_INTERVAL`` seconds in one call (one
round trip per batch instead of one per request). The buffer is pushed at exit too; a process killed
outright loses at most the entries of one interval, and the buffer holds at most
``API_LOG_BUFFER_MAX`` entries (more are dropped and counted, like a full list).
``API_LOG_PUSH_INTERVAL`` 0 pushes each entry from its request.
"""

import atexit
import functools
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import orjson
import redis
from django.conf import settings
from django.db import connection
from django.http import HttpRequest, HttpResponseBase
from django.urls import Resolver404, resolve

from apps.core.context import request_context

from . import instruments
from .conf import monitoring_setting
from .keys import API_LOG_DROPPED, API_LOG_LIST, LATENCY_BUCKETS_MS, REQUEST_STATS, key

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID_META = "HTTP_" + REQUEST_ID_HEADER.upper().replace("-", "_")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_GROUP = re.compile(r"\(\?P<(\w+)>[^)]*\)")
UNMATCHED = "<unmatched>"
REDIS_TIMEOUT_SECONDS = 0.5  # a slow Redis costs a request at most this, then the entry is dropped
# After a Redis failure, entries are dropped (and counted) without trying for this long, so that an
# unreachable Redis does not add its timeout to every request.
REDIS_BACKOFF_SECONDS = 5.0
PUSH_TICK = 0.01  # seconds between the push thread's looks at the clock (the interval may change)

# KEYS: log list, drop counter, stats hash. ARGV: list bound, entry count n, the n entries, then stats
# fields and increments as pairs (integers; the *_us fields carry microseconds so that one HINCRBY
# type fits every field).
_PUSH_SCRIPT = """
local bound = tonumber(ARGV[1])
local count = tonumber(ARGV[2])
local length = redis.call('LLEN', KEYS[1])
for i = 3, count + 2 do
  if length < bound then
    length = redis.call('LPUSH', KEYS[1], ARGV[i])
  else
    redis.call('INCR', KEYS[2])
  end
end
for i = count + 3, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[3], ARGV[i], ARGV[i + 1])
end
return 1
"""

_client: redis.Redis | None = None
_push: Any = None
_skip_redis_until = 0.0


def _push_script() -> Any:
    global _client, _push  # noqa: PLW0603  (one connection pool per process, made on first use)
    if _push is None:
        _client = redis.Redis.from_url(
            settings.REDIS_URL,
            socket_timeout=REDIS_TIMEOUT_SECONDS,
            socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
        )
        _push = _client.register_script(_PUSH_SCRIPT)
    return _push


#: A middleware that answers without URL resolution names the route here (``request.<ROUTE_HINT>``).
ROUTE_HINT = "novacron_route"


def route_pattern(request: HttpRequest) -> str:
    """``/api/v1/vms/{pk}/`` for ``/api/v1/vms/<uuid>/``: the resolver's route with named groups."""
    hint = getattr(request, ROUTE_HINT, None)
    if isinstance(hint, str):
        return hint
    match = request.resolver_match
    if match is None:
        try:
            match = resolve(request.path_info)
        except Resolver404:
            return UNMATCHED
    return _readable_route(match.route or "")


@functools.lru_cache(maxsize=1024)  # one entry per URL pattern
def _readable_route(route: str) -> str:
    route = _GROUP.sub(lambda group: "{" + group.group(1) + "}", route)
    route = route.replace("^", "").replace("$", "").replace("\\", "").replace("/?", "/")
    route = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", route)
    return "/" + route.lstrip("/")


def latency_bucket(duration_ms: float) -> str:
    for bound in LATENCY_BUCKETS_MS:
        if duration_ms <= bound:
            return f"le_{bound}"
    return "le_inf"


class RequestMonitorMiddleware:
    """Outermost middleware: sees every response, including those of the other middlewares."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        # From META: ``request.headers`` would build a mapping of every header on every request.
        incoming = request.META.get(_REQUEST_ID_META, "")
        request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        request_context(request).request_id = request_id
        stats = instruments.RequestStats()
        token = instruments.current_request.set(stats)
        started_at = time.time()
        started = time.perf_counter()
        try:
            with connection.execute_wrapper(_time_query):
                response = self.get_response(request)
        finally:
            instruments.current_request.reset(token)
        duration = time.perf_counter() - started
        response[REQUEST_ID_HEADER] = request_id
        self._record(request, response, stats, started_at=started_at, duration=duration)
        return response

    def _record(
        self,
        request: HttpRequest,
        response: HttpResponseBase,
        stats: instruments.RequestStats,
        *,
        started_at: float,
        duration: float,
    ) -> None:
        endpoint = route_pattern(request)
        method = request.method or "GET"
        if method not in {"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"}:
            method = "OTHER"  # arbitrary verbs must not mint label values
        status = response.status_code
        size = _response_bytes(response)
        labelled = instruments.labelled
        labelled(instruments.http_request_duration, method=method, endpoint=endpoint).observe(duration)
        labelled(instruments.http_requests, method=method, endpoint=endpoint, status=str(status)).inc()
        labelled(instruments.http_response_bytes, method=method, endpoint=endpoint).inc(size)
        if not request.path_info.startswith("/api/"):
            return
        user = getattr(request, "user", None)
        user_id = user.pk if user is not None and user.is_authenticated else None
        duration_ms = duration * 1000
        entry = orjson.dumps(
            {
                "ts": started_at,
                "user": user_id,
                "method": method,
                "endpoint": endpoint[:255],
                "status": status,
                "ms": round(duration_ms, 3),
                "bytes": size,
                "rid": request_context(request).request_id,
            }
        )
        increments = (
            ("requests", 1),
            ("errors", 1 if status >= 500 else 0),
            ("duration_us", round(duration_ms * 1000)),
            (latency_bucket(duration_ms), 1),
            ("db_queries", stats.db_queries),
            ("db_us", round(stats.db_seconds * 1_000_000)),
            ("cache_hits", stats.cache_hits),
            ("cache_misses", stats.cache_misses),
        )
        _buffer.add(entry, increments)


class _LogBuffer:
    """The API log entries and stats increments of this process not yet pushed to Redis."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: list[bytes] = []
        self._totals: dict[str, int] = {}
        self._thread: threading.Thread | None = None

    def add(self, entry: bytes, increments: Iterable[tuple[str, int]]) -> None:
        interval = float(monitoring_setting("API_LOG_PUSH_INTERVAL"))
        if interval <= 0:
            _send([entry], dict(increments))
            return
        with self._lock:
            if len(self._entries) >= monitoring_setting("API_LOG_BUFFER_MAX"):
                instruments.api_log_send_failures.inc()
                return
            self._entries.append(entry)
            for name, amount in increments:
                self._totals[name] = self._totals.get(name, 0) + amount
            if self._thread is None:  # started by the first request (after a pre-fork server forked)
                self._thread = threading.Thread(target=self._push_forever, name="api-log-push", daemon=True)
                self._thread.start()

    def push(self) -> None:
        with self._lock:
            entries, totals = self._entries, self._totals
            self._entries, self._totals = [], {}
        if entries:
            _send(entries, totals)

    def _push_forever(self) -> None:
        pushed = time.monotonic()
        while True:
            time.sleep(PUSH_TICK)
            if time.monotonic() - pushed >= float(monitoring_setting("API_LOG_PUSH_INTERVAL")):
                self.push()
                pushed = time.monotonic()


_buffer = _LogBuffer()
atexit.register(_buffer.push)


def push_api_logs() -> None:
    """Push this process's buffered API log entries now (at exit, and for tests)."""
    _buffer.push()


def _send(entries: list[bytes], totals: dict[str, int]) -> None:
    global _skip_redis_until  # noqa: PLW0603  (per-process back-off after a Redis failure)
    if time.monotonic() < _skip_redis_until:
        instruments.api_log_send_failures.inc(len(entries))
        return
    args: list[Any] = [monitoring_setting("API_LOG_BUFFER_MAX"), len(entries), *entries]
    for field, amount in totals.items():
        args.extend((field, amount))
    try:
        _push_script()(keys=[key(API_LOG_LIST), key(API_LOG_DROPPED), key(REQUEST_STATS)], args=args)
    except redis.RedisError as exc:
        _skip_redis_until = time.monotonic() + REDIS_BACKOFF_SECONDS
        instruments.api_log_send_failures.inc(len(entries))
        logger.warning(
            "API log entries lost for %.0f s, Redis did not answer: %s", REDIS_BACKOFF_SECONDS, exc
        )


def _time_query(execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any) -> Any:
    started = time.perf_counter()
    try:
        return execute(sql, params, many, context)
    finally:
        instruments.record_db_query(time.perf_counter() - started)


def _response_bytes(response: HttpResponseBase) -> int:
    if getattr(response, "streaming", False):
        length = response.get("Content-Length")
        return int(length) if length and length.isdigit() else 0
    return len(getattr(response, "content", b""))
