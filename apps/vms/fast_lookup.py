"""The VM read fast path's look-up (``middleware.py``): one Redis script from a token to an answer.

For a request not yet authenticated, :func:`fast_lookup` runs one script: from the token's memo to
the caller, the project they act in and their role there, the entry of :mod:`.cache`'s key layout
and the caller's rate-limit counters. Python gives it the slots of both scopes (a project, with
:data:`.cache.PROJECT_MARK` for its id; the fleet) and the counters' keys with :data:`USER_MARK` for
the user id, and the script fills in what it read from the memo. It reads only a hit's digest: the
body comes from this process's copy (:data:`.cache.bodies`) when the digests agree, else from one
more ``GET`` (a body handed through Lua costs Redis about 20 microseconds for a 15 KiB page).
"""

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import redis

from apps.core.authentication import token_memo_key
from apps.core.context import MEMO_FIELDS, ROLE_FIELD_PREFIX, Acting, Viewer
from apps.core.throttling import USER_MARK, KnownUserCounter

from . import cache as vm_cache
from .cache import (
    DIGEST_SIZE,
    ENTRY_KEY_LUA,
    PROJECT_MARK,
    Entry,
    count_lookup,
    query_digest,
    vm_detail_slot,
    vm_list_slot,
)

# The fast path's look-up. KEYS[1]: the token's memo (a hash: MEMO_FIELDS, then ROLE_FIELD_PREFIX +
# project id -> role). ARGV: [1] the project mark and [2] the user mark as Lua patterns, [3] to [5]
# the memo's field names (user id, staff flag, personal project), [6] the role fields' prefix, [7]
# the project the request names ('' for none), [8] '1' when the caller answers a miss itself, [9]
# n, the number of version keys of a slot; then the project's slot (prefix, suffix, n version keys,
# with the project mark where its id goes), the fleet's slot (same), the number of counters and
# each counter's key, limit and TTL, with the user mark where the user id goes. The request acts in
# the named project, else in the personal one; a staff caller naming none reads the fleet's slot.
# Returns {0} (unknown token; a project the caller has no role in, staff included: the full path
# answers it, 404 or the project's VMs; or no entry and [8] not '1'), {1, id, staff} (over a rate
# limit: the full path answers 429), {2, id, staff, project, role, entry key, digest} (a hit: the
# value's first DIGEST_SIZE bytes; project '' for the fleet, role '' for none) or {3, id, staff,
# project, role, entry key} (a miss for the caller to answer and store); {2} and {3} are counted
# in every counter. Keys are built here from the memo, so this script assumes one Redis (no
# cluster slots).
_FAST_SCRIPT = (
    ENTRY_KEY_LUA
    + """
local memo = redis.call('HMGET', KEYS[1], ARGV[3], ARGV[4], ARGV[5])
local uid, staff, project = memo[1], memo[2], memo[3]
if not uid or not staff or not project then return {0} end
local named = ARGV[7]
if named ~= '' then project = named end
local role = redis.call('HGET', KEYS[1], ARGV[6] .. project) or ''
local n = tonumber(ARGV[9])
local first = 10
if staff == '1' and named == '' then
  first = first + 2 + n
  project = ''
elseif role == '' then
  return {0}
end
local slot = {}
for i = first, first + 1 + n do slot[#slot + 1] = (string.gsub(ARGV[i], ARGV[1], project)) end
local key = entry_key(slot)
local digest = redis.call('GETRANGE', key, 0, DIGEST_END)
if digest == '' and ARGV[8] ~= '1' then return {0} end
local at = 10 + 2 * (2 + n)
local over = false
for i = at + 1, at + 3 * tonumber(ARGV[at]), 3 do
  local counter = (string.gsub(ARGV[i], ARGV[2], uid))
  local count = redis.call('INCR', counter)
  redis.call('EXPIRE', counter, tonumber(ARGV[i + 2]))
  if count > tonumber(ARGV[i + 1]) then over = true end
end
if over then return {1, uid, staff} end
if digest ~= '' then return {2, uid, staff, project, role, key, digest} end
return {3, uid, staff, project, role, key}
""".replace("DIGEST_END", str(DIGEST_SIZE - 1))
)
_FAST_SHA: Final = hashlib.sha1(_FAST_SCRIPT.encode()).hexdigest()  # noqa: S324 (Redis names scripts so)


@dataclass(frozen=True)
class FastHit:
    """A cached body found by :func:`fast_lookup`, whose it is and where the request acts."""

    viewer: Viewer
    acting: Acting
    body: bytes


@dataclass(frozen=True)
class FastMiss:
    """No entry yet: the caller, counted in their rate windows, where the request acts, and the slot
    to fill (:meth:`Entry.store`)."""

    viewer: Viewer
    acting: Acting
    entry: Entry


@dataclass(frozen=True)
class FastThrottled:
    """The caller is over a rate limit (the full path answers the 429)."""

    user_id: int


def _lua_pattern(mark: str) -> str:
    """``mark`` as a Lua pattern matching itself (punctuation escaped with %)."""
    return "".join(char if char.isalnum() else f"%{char}" for char in mark)


_PROJECT_MARK_PATTERN: Final = _lua_pattern(PROJECT_MARK)
_USER_MARK_PATTERN: Final = _lua_pattern(USER_MARK)


def _fast_call(memo_key: str, *args: str | int) -> Any:
    """The fast script (:func:`_own_command`); a Redis without it (restarted, flushed) is given it."""
    try:
        return vm_cache.own_command("EVALSHA", _FAST_SHA, 1, memo_key, *args)
    except redis.exceptions.NoScriptError:
        vm_cache.own_command("SCRIPT", "LOAD", _FAST_SCRIPT)
        return vm_cache.own_command("EVALSHA", _FAST_SHA, 1, memo_key, *args)


def fast_lookup(
    *,
    token: str,
    project: str | None,
    vm_id: str | None,
    query: str,
    counters: Sequence[KnownUserCounter],
    answer_misses: bool,
) -> FastHit | FastMiss | FastThrottled | None:
    """The cached VM list page (``vm_id`` None) or detail for a token, counted in its rate windows.

    ``project``: the id (text) of the project the request names, if any. ``counters``: the view's
    throttles' counters of an authenticated user (:mod:`apps.core.throttling`). ``answer_misses``:
    the caller reads and stores a missing entry itself (:class:`FastMiss`); otherwise a miss is
    None. None back means "not answerable here": unknown token, a project the caller has no role
    in, no entry, or Redis away; the caller then takes the full path, which authenticates, counts
    and caches.
    """
    digest = query_digest(query)
    if vm_id is None:
        slots = [vm_list_slot(project=scope, query_digest=digest) for scope in (PROJECT_MARK, None)]
    else:
        slots = [
            vm_detail_slot(project=scope, vm_id=vm_id, query_digest=digest) for scope in (PROJECT_MARK, None)
        ]
    misses = "1" if answer_misses else "0"
    args: list[str | int] = [_PROJECT_MARK_PATTERN, _USER_MARK_PATTERN, *MEMO_FIELDS, ROLE_FIELD_PREFIX]
    args += [project or "", misses, len(slots[0].versions)]
    for slot in slots:
        args += [slot.prefix, slot.suffix, *slot.versions]
    args.append(len(counters))
    for counter in counters:
        args += [counter.key, counter.limit, counter.ttl]
    try:
        answer = _fast_call(token_memo_key(token), *args)
    except redis.RedisError as exc:
        vm_cache.warn("fast look-up", exc)
        return None
    if answer[0] == 0:
        return None
    user_id, is_staff = int(answer[1]), answer[2] == b"1"
    if answer[0] == 1:
        return FastThrottled(user_id)
    project_id = int(answer[3]) if answer[3] else None
    viewer = Viewer(user_id=user_id, is_staff=is_staff, project_id=project_id)
    acting = Acting(project_id, answer[4].decode() or None)
    slot = slots[project_id is None]
    key = bytes(answer[5]).decode()
    if answer[0] == 3:
        return FastMiss(viewer, acting, Entry(slot.view, key, None, slot.ttl))
    body = _body(key, bytes(answer[6]), slot.ttl)
    if body is None:
        return None  # gone since the script read its digest: the full path answers
    count_lookup(slot.view, hit=True)
    return FastHit(viewer, acting, body)


def _body(key: str, digest: bytes, ttl: int) -> bytes | None:
    """The body stored under ``key`` with ``digest``: this process's copy, else read from Redis
    (and kept for the entry's ``ttl``)."""
    body = vm_cache.bodies.get(key, digest)
    if body is not None:
        return body
    try:
        value = vm_cache.own_command("GET", key)
    except redis.RedisError as exc:
        vm_cache.warn("fast look-up", exc)
        return None
    if value is None:
        return None
    value = bytes(value)
    body = value[DIGEST_SIZE:]
    vm_cache.bodies.put(key, value[:DIGEST_SIZE], body, ttl)
    return body


def fast_uncount(user_id: int, counters: Sequence[KnownUserCounter]) -> None:
    """Take back what :func:`fast_lookup` counted for a request the full path answers uncounted
    (refused by a permission before DRF's throttles run)."""
    try:
        pipe = vm_cache.redis_connection().pipeline(transaction=False)
        for counter in counters:
            pipe.decr(counter.key.replace(USER_MARK, str(user_id)))
        pipe.execute()
    except redis.RedisError as exc:
        vm_cache.warn("uncount", exc)
