"""Response cache of the VM list, VM detail and ``users/me``'s usage: JSON in Redis, per viewer.

Rules:

- A cached body is only ever read back by the viewer it was made for: every key holds the
  viewer's id and whether they are staff (a user and an operator never share an entry, and an
  operator who loses staff rights no longer reads the operator's entries).
- Invalidation is by version counters, not by waiting for a TTL: a key embeds the versions of what
  the body shows (``owner:<id>`` for a user's VMs, ``all`` for every VM, as staff see them,
  ``vm:<id>`` for one VM, ``fleet`` for node and image names). Writes bump the versions
  (:func:`vms_changed`, :func:`owner_changed`, :func:`fleet_changed`) in the services, once at
  once and again after commit, so no reader can store pre-commit rows under the new versions for
  longer than the transaction lasts. Old entries are never read again and expire.
- TTLs are only upper bounds (list 60 s, detail and me 300 s): they bound what a write made
  outside the services (a shell, a version key lost to eviction) can leave stale.
- Redis down or slow: look-ups and stores give up (logged at most every ``LOG_EVERY_SECONDS``) and
  the view reads the database; a request never fails because of the cache.

One look-up is one round trip: a Lua script reads the versions, builds the key and returns the body.
:func:`fast_lookup` is the same look-up for a request not yet authenticated (the VM read fast path,
``middleware.py``): from the token's memo to the user, their rate-limit window and the entry, in one
script; on a miss it gives the caller and the slot, for the fast path to read and store the answer.
Both build keys with the same layout (``<prefix>:<versions...>:<scope>[:<vm>]:<query digest>``).
Hits and misses go to ``novacron_api_cache_requests_total{view,result}`` and to the monitoring
app's cache counters (``cache.hit_ratio``).
"""

import hashlib
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import redis
from django.conf import settings
from django.core.signals import setting_changed
from django.db import transaction
from django.dispatch import receiver
from django_redis import get_redis_connection
from prometheus_client import Counter

from apps.core.authentication import token_memo_key
from apps.core.throttling import UserWindow
from apps.monitoring.instruments import labelled, record_cache_lookup

logger = logging.getLogger(__name__)

LIST_TTL: Final = 60  # seconds; upper bounds, the version counters do the invalidating
DETAIL_TTL: Final = 300
ME_TTL: Final = 300
# Version keys outlive every entry built on them (the longest TTL) by far; refreshed on each bump.
VERSION_TTL: Final = 7 * 24 * 3600
LOG_EVERY_SECONDS: Final = 30.0  # one warning per process per interval while Redis is away

api_cache_requests = Counter(
    "novacron_api_cache_requests", "API response cache look-ups, by view and result.", ["view", "result"]
)

# KEYS: the version keys. ARGV[1]: entry key prefix, ARGV[2]: suffix. A missing version reads 0.
_LOOKUP_SCRIPT = """
local parts = {ARGV[1]}
for i = 1, #KEYS do
  parts[#parts + 1] = redis.call('GET', KEYS[i]) or '0'
end
local key = table.concat(parts, ':') .. ARGV[2]
return {key, redis.call('GET', key)}
"""
_lookup: Any = None
_last_warning = 0.0

# The fast path's look-up. KEYS[1]: the token memo ("<user id>:<0|1 staff>"). ARGV: [1] version key
# prefix, [2] entry key prefix (vm_list or vm_detail), [3] VM id ('' for the list), [4] query
# digest, [5] user throttle key prefix, [6] window number, [7] window seconds, [8] limit (-1: none),
# [9] '1' when the caller answers a miss itself. Returns {0} (unknown token, or no entry and [9] not
# '1': the full path answers and counts), {1} (over the rate limit: the full path answers 429),
# {2, user id, staff, body} (a hit) or {3, user id, staff, entry key} (a miss for the caller to
# answer and store); {2} and {3} are counted in the window. The user-dependent keys are built here,
# so this script assumes one Redis (no cluster slots).
_FAST_SCRIPT = """
local memo = redis.call('GET', KEYS[1])
if not memo then return {0} end
local uid, staff = string.match(memo, '^(%d+):([01])$')
if not uid then return {0} end
local scope, first
if staff == '1' then scope = 's' .. uid; first = 'all' else scope = 'u' .. uid; first = 'owner:' .. uid end
if ARGV[3] ~= '' then first = 'vm:' .. ARGV[3] end
local v1 = redis.call('GET', ARGV[1] .. first) or '0'
local v2 = redis.call('GET', ARGV[1] .. 'fleet') or '0'
local key = ARGV[2] .. ':' .. v1 .. ':' .. v2 .. ':' .. scope
if ARGV[3] ~= '' then key = key .. ':' .. ARGV[3] end
key = key .. ':' .. ARGV[4]
local body = redis.call('GET', key)
if not body and ARGV[9] ~= '1' then return {0} end
local limit = tonumber(ARGV[8])
if limit >= 0 then
  local counter = ARGV[5] .. uid .. ':' .. ARGV[6]
  local count = redis.call('INCR', counter)
  redis.call('EXPIRE', counter, tonumber(ARGV[7]) + 1)
  if count > limit then return {1} end
end
if body then return {2, uid, staff, body} end
return {3, uid, staff, key}
"""


def _warn(action: str, exc: Exception) -> None:
    global _last_warning  # noqa: PLW0603  (per-process log throttle)
    now = time.monotonic()
    if now - _last_warning >= LOG_EVERY_SECONDS:
        _last_warning = now
        logger.warning("API cache %s skipped, Redis did not answer (reading the database): %s", action, exc)


def _connection() -> redis.Redis:
    return get_redis_connection("default")  # the Django cache's Redis (CACHES["default"])


def _key(*parts: object) -> str:
    return ":".join([settings.CACHE_KEY_PREFIX, "apicache", *(str(part) for part in parts)])


def _version_key(name: str) -> str:
    return _key("v", name)


@dataclass(frozen=True)
class Viewer:
    """Whose cache entries a request may read: the user and whether they see every VM."""

    user_id: int
    is_staff: bool

    @property
    def scope(self) -> str:
        return f"{'s' if self.is_staff else 'u'}{self.user_id}"


@dataclass(frozen=True)
class Entry:
    """A resolved cache slot: the key to store under (versions included) and the body if cached."""

    view: str
    key: str | None  # None: Redis did not answer, do not store
    body: bytes | None
    ttl: int

    def store(self, body: bytes) -> None:
        if self.key is None:
            return
        try:
            _own_command("SET", self.key, body, "EX", self.ttl)
        except redis.RedisError as exc:
            _warn("store", exc)


def _resolve(view: str, versions: Sequence[str], suffix: str, ttl: int) -> Entry:
    global _lookup  # noqa: PLW0603  (the script object is made once per process)
    try:
        connection = _connection()
        if _lookup is None:
            _lookup = connection.register_script(_LOOKUP_SCRIPT)
        key, body = _lookup(
            keys=[_version_key(name) for name in versions], args=[_key(view), suffix], client=connection
        )
    except redis.RedisError as exc:
        _warn("look-up", exc)
        api_cache_requests.labels(view=view, result="error").inc()
        record_cache_lookup(hit=False)
        return Entry(view, None, None, ttl)
    count_lookup(view, hit=body is not None)
    return Entry(view, key.decode() if isinstance(key, bytes) else str(key), body, ttl)


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def vm_list_entry(*, viewer: Viewer, query: str) -> Entry:
    """The slot of one VM list page (``query``: the request's query string, filters and cursor)."""
    scope_version = "all" if viewer.is_staff else f"owner:{viewer.user_id}"
    return _resolve("vm_list", [scope_version, "fleet"], f":{viewer.scope}:{_digest(query)}", LIST_TTL)


def vm_detail_entry(*, viewer: Viewer, vm_id: str, query: str) -> Entry:
    return _resolve(
        "vm_detail", [f"vm:{vm_id}", "fleet"], f":{viewer.scope}:{vm_id}:{_digest(query)}", DETAIL_TTL
    )


def me_usage_entry(*, viewer: Viewer) -> Entry:
    """The slot of ``users/me``'s usage (its costly part: an aggregate over the caller's VMs).

    The rest of ``me`` is read live: the user row is already loaded by authentication, and the
    quota is one indexed row an operator may edit in the admin (no service to bump a version).
    """
    return _resolve("me", [f"owner:{viewer.user_id}"], f":{viewer.scope}", ME_TTL)


@dataclass(frozen=True)
class FastHit:
    """A cached body found by :func:`fast_lookup`, and whose it is."""

    viewer: Viewer
    body: bytes


@dataclass(frozen=True)
class FastMiss:
    """No entry yet: the caller, counted in their rate window, and the slot to fill (:meth:`Entry.store`)."""

    viewer: Viewer
    entry: Entry


#: :func:`fast_lookup` found the caller over their rate limit (the full path answers the 429).
THROTTLED: Final = "throttled"


_FAST_SHA: Final = hashlib.sha1(_FAST_SCRIPT.encode()).hexdigest()  # noqa: S324 (Redis names scripts so)
_own = threading.local()  # this thread's own Redis connection (look-ups, stores) and its pool
_caches_generation = [0]  # bumped when CACHES changes (tests), so that threads look at the pool again


@receiver(setting_changed)
def _caches_changed(*, setting: str, **kwargs: Any) -> None:
    if setting == "CACHES":
        _caches_generation[0] += 1


def _own_command(*command: object) -> Any:
    """One command on this thread's own connection to the cache's Redis.

    One connection per web thread, kept, instead of redis-py's pool check-out and release, retry and
    deprecation wrappers around every command, which dominate a cached hit's CPU. It is made with the
    pool's settings (address, timeouts) and made again when the cache's pool changes or after an
    error, which is raised as redis-py raises it. The pool is looked up again only when ``CACHES``
    changed, not through Django's cache handler on every call.
    """
    own = getattr(_own, "connection", None)
    if own is None or getattr(_own, "generation", None) != _caches_generation[0]:
        generation = _caches_generation[0]
        pool = _connection().connection_pool
        if own is None or getattr(_own, "pool", None) is not pool:
            if own is not None:
                own.disconnect()  # made for a pool the cache no longer uses (settings changed)
            own = _own.connection = pool.connection_class(**pool.connection_kwargs)
            _own.pool = pool
        _own.generation = generation
    try:
        own.send_command(*command)
        return own.read_response()
    except (redis.ConnectionError, redis.TimeoutError):
        own.disconnect()  # the next call connects again
        raise


def _fast_call(memo_key: str, *args: object) -> Any:
    """The fast script (:func:`_own_command`); a Redis without it (restarted, flushed) is given it."""
    try:
        return _own_command("EVALSHA", _FAST_SHA, 1, memo_key, *args)
    except redis.exceptions.NoScriptError:
        _own_command("SCRIPT", "LOAD", _FAST_SCRIPT)
        return _own_command("EVALSHA", _FAST_SHA, 1, memo_key, *args)


def fast_lookup(
    *, token: str, vm_id: str | None, query: str, throttle: UserWindow | None, answer_misses: bool
) -> FastHit | FastMiss | str | None:
    """The cached VM list page (``vm_id`` None) or detail for a token, counted in its rate window.

    ``throttle``: the users' current rate window (None when users are not rate limited).
    ``answer_misses``: the caller reads and stores a missing entry itself (:class:`FastMiss`);
    otherwise a miss is None. None back means "not answerable here": unknown token, no entry, or
    Redis away; the caller then takes the full path, which authenticates, counts and caches.
    """
    view = "vm_list" if vm_id is None else "vm_detail"
    window = throttle or UserWindow("", 0, 0, -1)
    try:
        answer = _fast_call(
            token_memo_key(token),
            _version_key(""),
            _key(view),
            vm_id or "",
            _digest(query),
            window.key_prefix,
            window.number,
            window.seconds,
            window.limit,
            "1" if answer_misses else "0",
        )
    except redis.RedisError as exc:
        _warn("fast look-up", exc)
        return None
    if answer[0] == 0:
        return None
    if answer[0] == 1:
        return THROTTLED
    viewer = Viewer(user_id=int(answer[1]), is_staff=answer[2] == b"1")
    if answer[0] == 3:
        ttl = LIST_TTL if vm_id is None else DETAIL_TTL
        return FastMiss(viewer, Entry(view, bytes(answer[3]).decode(), None, ttl))
    count_lookup(view, hit=True)
    return FastHit(viewer, bytes(answer[3]))


def count_lookup(view: str, *, hit: bool) -> None:
    """One look-up of ``view`` in the metrics (a fast-path miss is counted once it is answered)."""
    labelled(api_cache_requests, view=view, result="hit" if hit else "miss").inc()
    record_cache_lookup(hit=hit)


# --- Invalidation -----------------------------------------------------------------------------------


def _bump(names: Sequence[str]) -> None:
    if not names:
        return
    try:
        pipe = _connection().pipeline(transaction=False)
        for name in names:
            key = _version_key(name)
            pipe.incr(key)
            pipe.expire(key, VERSION_TTL)
        pipe.execute()
    except redis.RedisError as exc:
        # The write stands; entries built before it live at most their TTL.
        logger.warning("API cache invalidation of %d version(s) failed: %s", len(names), exc)


def _bump_now_and_on_commit(names: Sequence[str]) -> None:
    names = list(dict.fromkeys(names))
    _bump(names)
    if transaction.get_connection().in_atomic_block:
        transaction.on_commit(lambda: _bump(names))


def vms_changed(vms: Iterable[Any]) -> None:
    """VMs changed what they show (state, name, size, node...): their detail, owners' lists and me."""
    names: list[str] = ["all"]
    for vm in vms:
        names.append(f"owner:{vm.owner_id}")
        names.append(f"vm:{vm.pk}")
    _bump_now_and_on_commit(names)


def vm_rows_changed(rows: Iterable[tuple[Any, int]]) -> None:
    """Like :func:`vms_changed`, for ``(vm_id, owner_id)`` pairs of rows changed by a bulk update."""
    names: list[str] = ["all"]
    for vm_id, owner_id in rows:
        names.append(f"owner:{owner_id}")
        names.append(f"vm:{vm_id}")
    _bump_now_and_on_commit(names)


def owner_changed(*, owner_id: int) -> None:
    """New VMs for ``owner_id`` (no detail of them can be cached yet): their lists and me."""
    _bump_now_and_on_commit(["all", f"owner:{owner_id}"])


def fleet_changed() -> None:
    """A node or image changed name or went away: every VM body may show it."""
    _bump_now_and_on_commit(["fleet"])
