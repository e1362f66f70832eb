"""Response cache of the VM list, VM detail and ``users/me``'s usage: JSON in Redis, per viewer.

Rules:

- A cached body is only ever read back by viewers who see what it shows: every key holds its
  scope, the project the reads are of (``p<id>``: read by the members of that project, who all see
  the same) or ``all`` (the whole fleet, read by staff naming no project only). No member of one
  project ever reads an entry made for another.
- Invalidation is by version counters, not by waiting for a TTL: a key embeds the versions of what
  the body shows (``project:<id>`` for a project's VMs, ``all`` for every VM, ``vm:<id>`` for one
  VM, ``fleet`` for node and image names): which of ``project:<id>`` and ``all`` is the visibility
  rule's (:func:`.selectors.visible_project`). Writes bump the versions
  (:func:`vms_changed`, :func:`project_changed`, :func:`fleet_changed`) in the services, once at
  once and again after commit, so no reader can store pre-commit rows under the new versions for
  longer than the transaction lasts. Old entries are never read again and expire.
- TTLs are only upper bounds (list 60 s, detail and me 300 s): they bound what a write made
  outside the services (a shell, a version key lost to eviction) can leave stale.
- Redis down or slow: look-ups and stores give up (logged at most every ``LOG_EVERY_SECONDS``) and
  the view reads the database; a request never fails because of the cache.

The key layout is declared once, here: a :class:`Slot` names the version keys, the prefix and the
suffix of an entry (:func:`vm_list_slot`, :func:`vm_detail_slot`, :func:`me_usage_slot`), and the
one Lua function :data:`ENTRY_KEY_LUA` joins them with the versions' current values
(``<prefix>:<versions...><suffix>``). A VM body's prefix holds the representation's fingerprint
(:func:`.representation.fingerprint`): bodies made before a field was added are never read.

One look-up is one round trip: the script reads the versions, builds the key and returns the body
(:func:`lookup`). A stored value is the body's digest (:data:`DIGEST_SIZE` bytes of xxh3-128) and
then the body; this process keeps copies of the bodies it stored or read (:data:`bodies`, each for
at most its entry's TTL), which the fast path's look-up (:mod:`.fast_lookup`) answers from when
Redis holds the same digest. Hits and misses go to
``novacron_api_cache_requests_total{view,result}`` and to the monitoring app's cache counters
(``cache.hit_ratio``).
"""

import functools
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

import hiredis
import redis
import xxhash
from django.conf import settings
from django.core.signals import setting_changed
from django.dispatch import receiver
from django_redis import get_redis_connection
from prometheus_client import Counter

from apps.core.context import Viewer
from apps.core.db import now_and_after_commit
from apps.monitoring.instruments import labelled, record_cache_lookup

from . import representation
from .selectors import visible_project

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

DIGEST_SIZE: Final = 16  # an entry's value: xxh3-128 of the body, then the body
VALUE_FORMAT: Final = "x16"  # in every entry's prefix: entries of another value format are never read
# Bytes of bodies one process keeps (:class:`_Bodies`), least recently used dropped first.
LOCAL_BODIES_BYTES: Final = 16 * 1024 * 1024
# What a kept body costs besides its bytes: its key, digest, tuple and the dict's node (measured ~250).
BODY_ENTRY_OVERHEAD: Final = 256

# The key layout's join: a slot's prefix, the current value of each of its version keys (a missing
# one reads 0), then its suffix. ``slot`` is a Lua table {prefix, suffix, version key...}.
ENTRY_KEY_LUA = """
local function entry_key(slot)
  local parts = {slot[1]}
  for i = 3, #slot do
    parts[#parts + 1] = redis.call('GET', slot[i]) or '0'
  end
  return table.concat(parts, ':') .. slot[2]
end
"""

# KEYS: the version keys. ARGV[1]: entry key prefix, ARGV[2]: suffix.
_LOOKUP_SCRIPT = (
    ENTRY_KEY_LUA
    + """
local slot = {ARGV[1], ARGV[2]}
for i = 1, #KEYS do slot[#slot + 1] = KEYS[i] end
local key = entry_key(slot)
return {key, redis.call('GET', key)}
"""
)

_lookup: Any = None
_last_warning = 0.0


def warn(action: str, exc: Exception) -> None:
    global _last_warning  # noqa: PLW0603  (per-process log throttle)
    now = time.monotonic()
    if now - _last_warning >= LOG_EVERY_SECONDS:
        _last_warning = now
        logger.warning("API cache %s skipped, Redis did not answer (reading the database): %s", action, exc)


def redis_connection() -> redis.Redis:
    return get_redis_connection("default")  # the Django cache's Redis (CACHES["default"])


def _key(*parts: object) -> str:
    return ":".join([settings.CACHE_KEY_PREFIX, "apicache", *(str(part) for part in parts)])


# --- Key layout -------------------------------------------------------------------------------------

ALL_VMS: Final = "all"
FLEET: Final = "fleet"


def _project_version(project_id: object) -> str:
    return f"project:{project_id}"


def _vm_version(vm_id: object) -> str:
    return f"vm:{vm_id}"


def _version_key(name: str) -> str:
    return _key("v", name)


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


class Slot(NamedTuple):  # a tuple: made twice per fast look-up, a frozen dataclass costs more
    """Where one cached answer lives: its key is ``<prefix>:<the versions' values...><suffix>``."""

    view: str
    prefix: str
    suffix: str
    versions: tuple[str, ...]  # version keys
    ttl: int


#: Stands for the project's id in a slot given to the fast script (replaced with the memo's or named one).
PROJECT_MARK: Final = "{project}"


@functools.lru_cache(maxsize=4096)
def _scope_parts(
    key_prefix: str, view: str, fingerprint: str, project: str | None
) -> tuple[str, str, str, str]:
    """What the slots of ``view`` of one scope are made of: the entry prefix, the scope (``project``,
    its id as text; None: the whole fleet), the version key of what it shows and the fleet's (made
    once per scope, not per look-up)."""
    visible = ALL_VMS if project is None else _project_version(project)
    return (
        f"{key_prefix}:apicache:{view}:{VALUE_FORMAT}{fingerprint}",
        ALL_VMS if project is None else f"p{project}",
        f"{key_prefix}:apicache:v:{visible}",
        f"{key_prefix}:apicache:v:{FLEET}",
    )


def _scope(viewer: Viewer) -> str | None:
    project = visible_project(viewer)
    return None if project is None else str(project)


def vm_list_slot(*, project: str | None, query_digest: str) -> Slot:
    """One VM list page of the VMs of ``project`` (its id as text; None: the fleet);
    ``query_digest``: the :func:`query_digest` of its filters and cursor."""
    prefix, scope, visible, fleet = _scope_parts(
        settings.CACHE_KEY_PREFIX, "vm_list", representation.fingerprint(), project
    )
    return Slot("vm_list", prefix, f":{scope}:{query_digest}", (visible, fleet), LIST_TTL)


def vm_detail_slot(*, project: str | None, vm_id: str, query_digest: str) -> Slot:
    """One VM as the readers of ``project`` see it: its entry holds the version of that VM."""
    prefix, scope, _, fleet = _scope_parts(
        settings.CACHE_KEY_PREFIX, "vm_detail", representation.fingerprint(), project
    )
    versions = (_version_key(_vm_version(vm_id)), fleet)
    return Slot("vm_detail", prefix, f":{scope}:{vm_id}:{query_digest}", versions, DETAIL_TTL)


def me_usage_slot(*, project_id: int) -> Slot:
    """The slot of ``users/me``'s usage of a project (its costly part: an aggregate over its VMs).

    The rest of ``me`` is read live: the user row is already loaded by authentication, and the
    quota is one indexed row an operator may change (no version bumped for it).
    """
    versions = (_version_key(_project_version(project_id)),)
    return Slot("me", _key("me", VALUE_FORMAT), f":p{project_id}", versions, ME_TTL)


def query_digest(query: str) -> str:
    """The part of a key that stands for a request's query string (filters, cursor)."""
    return _digest(query)


# --- Look-ups ---------------------------------------------------------------------------------------


def value_of(body: bytes) -> tuple[bytes, bytes]:
    """The digest of ``body`` and the value that stores it."""
    digest = xxhash.xxh3_128_digest(body)
    return digest, digest + body


class _Bodies:
    """This process's copies of entries' bodies, by entry key, with their digests, least recently
    used dropped first beyond :data:`LOCAL_BODIES_BYTES`, and none kept longer than its entry's TTL.
    A copy answers only a look-up whose digest (read from Redis) is its own, so it is the stored body
    byte for byte.

    The budget counts what the copies really hold: a copy is made to its length (a ``bytes`` from
    ``orjson.dumps`` keeps orjson's whole 4 KiB write buffer, so a 100-byte body cost 4 KiB: the
    soak's web process grew by ~2.5 MiB a minute while the budget believed the cache a tenth of its
    size), and each entry's key and bookkeeping count too.

    A copy goes once its entry's TTL has passed since it was kept: every write makes new versions, so
    old entries are never read again, and copies kept until the budget pushed them out made the web
    process grow by its whole budget (about 0.25 MiB a minute in the soak, for an hour). Expired
    copies are the least recently used ones; each ``put`` drops them from the front."""

    def __init__(self, budget: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.budget = budget
        self.clock = clock
        self.used = 0
        self.found: OrderedDict[str, tuple[bytes, bytes, float]] = OrderedDict()  # digest, body, until
        self.lock = threading.Lock()

    def get(self, key: str, digest: bytes) -> bytes | None:
        with self.lock:
            found = self.found.get(key)
            if found is None or found[0] != digest or found[2] <= self.clock():
                return None
            self.found.move_to_end(key)
            return found[1]

    def put(self, key: str, digest: bytes, body: bytes, ttl: float) -> None:
        if self._cost(key, body) > self.budget:
            return
        kept = bytes(memoryview(body))  # a copy of exactly its length (see the class's docstring)
        now = self.clock()
        with self.lock:
            previous = self.found.pop(key, None)
            if previous is not None:
                self.used -= self._cost(key, previous[1])
            self.found[key] = (digest, kept, now + ttl)
            self.used += self._cost(key, kept)
            while self.found:
                oldest_key, (_, oldest, until) = next(iter(self.found.items()))
                if self.used <= self.budget and until > now:
                    break
                del self.found[oldest_key]
                self.used -= self._cost(oldest_key, oldest)

    @staticmethod
    def _cost(key: str, body: bytes) -> int:
        return len(body) + len(key) + BODY_ENTRY_OVERHEAD


bodies = _Bodies(LOCAL_BODIES_BYTES)  # this process's (the fast look-up reads them)


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
        digest, value = value_of(body)
        try:
            own_command("SET", self.key, value, "EX", self.ttl)
        except redis.RedisError as exc:
            warn("store", exc)
            return
        bodies.put(self.key, digest, body, self.ttl)


def lookup(slot: Slot) -> Entry:
    """The entry of ``slot`` now (one round trip), counted as a hit or a miss."""
    global _lookup  # noqa: PLW0603  (the script object is made once per process)
    try:
        connection = redis_connection()
        if _lookup is None:
            _lookup = connection.register_script(_LOOKUP_SCRIPT)
        key, value = _lookup(keys=list(slot.versions), args=[slot.prefix, slot.suffix], client=connection)
    except redis.RedisError as exc:
        warn("look-up", exc)
        api_cache_requests.labels(view=slot.view, result="error").inc()
        record_cache_lookup(hit=False)
        return Entry(slot.view, None, None, slot.ttl)
    count_lookup(slot.view, hit=value is not None)
    body = None if value is None else bytes(value[DIGEST_SIZE:])
    return Entry(slot.view, key.decode() if isinstance(key, bytes) else str(key), body, slot.ttl)


def vm_list_entry(*, viewer: Viewer, query: str) -> Entry:
    """The entry of one VM list page (``query``: the request's query string, filters and cursor)."""
    return lookup(vm_list_slot(project=_scope(viewer), query_digest=query_digest(query)))


def vm_detail_entry(*, viewer: Viewer, vm_id: str, query: str) -> Entry:
    return lookup(vm_detail_slot(project=_scope(viewer), vm_id=vm_id, query_digest=query_digest(query)))


def me_usage_entry(*, project_id: int) -> Entry:
    return lookup(me_usage_slot(project_id=project_id))


_own = threading.local()  # this thread's own Redis connection (look-ups, stores) and its pool
_caches_generation = [0]  # bumped when CACHES changes (tests), so that threads look at the pool again


@receiver(setting_changed)
def _caches_changed(*, setting: str, **kwargs: Any) -> None:
    if setting == "CACHES":
        _caches_generation[0] += 1


def own_command(*command: str | int | bytes) -> Any:
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
        pool = redis_connection().connection_pool
        if own is None or getattr(_own, "pool", None) is not pool:
            if own is not None:
                own.disconnect()  # made for a pool the cache no longer uses (settings changed)
            own = _own.connection = pool.connection_class(**pool.connection_kwargs)
            _own.pool = pool
        _own.generation = generation
    try:
        # hiredis writes the command in C (redis-py's send_command checks each argument in Python
        # first: a tenth of a cached hit's CPU for the fast script's arguments).
        packed = hiredis.pack_command(command)  # type: ignore[arg-type]  # its stub says a 1-tuple
        own.send_packed_command([packed], check_health=False)
        return own.read_response()
    except (redis.ConnectionError, redis.TimeoutError):
        own.disconnect()  # the next call connects again
        raise


def count_lookup(view: str, *, hit: bool) -> None:
    """One look-up of ``view`` in the metrics (a fast-path miss is counted once it is answered)."""
    labelled(api_cache_requests, view=view, result="hit" if hit else "miss").inc()
    record_cache_lookup(hit=hit)


# --- Invalidation -----------------------------------------------------------------------------------


def _bump(names: Sequence[str]) -> None:
    if not names:
        return
    try:
        pipe = redis_connection().pipeline(transaction=False)
        for name in names:
            key = _version_key(name)
            pipe.incr(key)
            pipe.expire(key, VERSION_TTL)
        pipe.execute()
    except redis.RedisError as exc:
        # The write stands; entries built before it live at most their TTL.
        logger.warning("API cache invalidation of %d version(s) failed: %s", len(names), exc)


def _bump_now_and_on_commit(names: Sequence[str]) -> None:
    unique = list(dict.fromkeys(names))
    now_and_after_commit(lambda: _bump(unique))


def vms_changed(vms: Iterable[Any]) -> None:
    """VMs changed what they show (state, name, size, node...): their detail, projects' lists and me."""
    names: list[str] = [ALL_VMS]
    for vm in vms:
        names.append(_project_version(vm.project_id))
        names.append(_vm_version(vm.pk))
    _bump_now_and_on_commit(names)


def vm_rows_changed(rows: Iterable[tuple[Any, int]]) -> None:
    """Like :func:`vms_changed`, for ``(vm_id, project_id)`` pairs of rows changed by a bulk update."""
    names: list[str] = [ALL_VMS]
    for vm_id, project_id in rows:
        names.append(_project_version(project_id))
        names.append(_vm_version(vm_id))
    _bump_now_and_on_commit(names)


def project_changed(*, project_id: int) -> None:
    """New VMs in ``project_id`` (no detail of them can be cached yet): its lists and me."""
    _bump_now_and_on_commit([ALL_VMS, _project_version(project_id)])


def fleet_changed() -> None:
    """A node or image changed name or went away: every VM body may show it."""
    _bump_now_and_on_commit([FLEET])
