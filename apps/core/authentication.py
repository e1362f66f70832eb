"""Token authentication (:class:`apps.accounts.models.ApiToken`) in one fixed SQL query, and the
tokens' memos in Redis that the VM read fast path trusts.

Every API request authenticates, so the token look-up is on every path, the cached ones included;
building it through the ORM costs more CPU than running it. :class:`FastTokenAuthentication` runs
the join of token and user as a fixed prepared statement, found by the SHA-256 of the secret, and
builds both with ``Model.from_db``. It answers 401 "Invalid token." (unknown), "Token expired." and
"User inactive or deleted.", and 403 to a read-only token on a method that writes. Nothing is cached
on this path and nothing is written to the database, so a revoked token or a deactivated user is
refused on the next request.

The same query reads where the caller may act: their personal project and their memberships
(:class:`apps.core.context.Caller`, in the request's context).

A successful look-up is also remembered in Redis (:func:`remember_token`) for the VM read fast path
(``apps/vms/middleware.py``), which answers cached reads without this query. A memo is keyed by the
token's digest (:func:`token_memo_key`), so Redis never holds the secret and the memos of tokens
known only from the database can be dropped (:func:`forget_tokens`, :func:`forget_user`). Invariants:
a memo never outlives its token's expiry, nor ``TOKEN_MEMO_TTL`` seconds (bounding a change made
around the ORM's signals, such as ``QuerySet.update``); when a token is revoked or its user changes
(``apps/accounts/signals.py``) its memo is replaced by a tombstone that no request may overwrite for
``TOKEN_MEMO_BLOCK`` seconds, so a request that read the token's old row just before the change
cannot store it again behind the change.
"""

import logging
import time
from datetime import datetime
from functools import cache
from typing import Final

import redis
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.db import connection
from django.utils import timezone
from django_redis import get_redis_connection
from rest_framework import exceptions
from rest_framework.authentication import TokenAuthentication
from rest_framework.permissions import SAFE_METHODS
from rest_framework.request import Request

from apps.accounts.models import ApiToken, token_digest
from apps.core.context import Caller, request_context
from apps.core.db import columns, fetch_prepared, instance_from_row, text_agg
from apps.projects.models import Membership, Project

logger = logging.getLogger(__name__)

TOKEN_MEMO_TTL: Final = 60  # seconds a remembered token answers without the database
# A process writes a token's memo at most once per this interval (not on every request it serves),
# and remembers at most this many tokens' write times before starting over.
TOKEN_MEMO_REFRESH: Final = TOKEN_MEMO_TTL / 2
TOKEN_MEMO_LOCAL_MAX: Final = 10_000
# Seconds a forgotten token's tombstone refuses new memos: far longer than a request takes from its
# look-up to its memo write, short enough that the fast path soon serves the token again.
TOKEN_MEMO_BLOCK: Final = 10
_TOMBSTONE_FIELD: Final = "forgotten"  # the tombstone hash's field (no Viewer field: never a memo)
_memo_written: dict[tuple[str, Caller], float] = {}

# KEYS[1]: the memo. ARGV: [1] the tombstone's field, [2] the TTL in milliseconds, then the memo's
# fields and values. Writes nothing over a tombstone.
_REMEMBER_SCRIPT: Final = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""


def _memo_key(digest: str) -> str:
    return f"{settings.CACHE_KEY_PREFIX}:authtoken:{digest}"


def token_memo_key(key: str) -> str:
    """Redis key of the memo of the token whose secret is ``key``: made of its digest, never the secret."""
    return _memo_key(token_digest(key))


def remember_token(key: str, caller: Caller, *, expires_at: datetime | None = None) -> None:
    """Store the :class:`Caller` of an active user's token (the user, their personal project and
    their roles) as a Redis hash (best effort), for ``TOKEN_MEMO_TTL`` seconds or until
    ``expires_at`` if sooner; never over a tombstone.

    Skipped when this process wrote the same less than ``TOKEN_MEMO_REFRESH`` ago: if it was
    removed since, the fast path only misses (and this slower path answers) until the next write.
    """
    ttl_ms = TOKEN_MEMO_TTL * 1000
    if expires_at is not None:
        ttl_ms = min(ttl_ms, int((expires_at - timezone.now()).total_seconds() * 1000))
        if ttl_ms <= 0:
            return
    digest = token_digest(key)
    now = time.monotonic()
    local = (digest, caller)
    if now - _memo_written.get(local, -TOKEN_MEMO_REFRESH) < TOKEN_MEMO_REFRESH:
        return
    if len(_memo_written) >= TOKEN_MEMO_LOCAL_MAX:
        _memo_written.clear()
    fields = [item for pair in caller.as_memo().items() for item in pair]
    try:
        client = get_redis_connection("default")
        client.register_script(_REMEMBER_SCRIPT)(
            keys=[_memo_key(digest)], args=[_TOMBSTONE_FIELD, ttl_ms, *fields]
        )
    except redis.RedisError as exc:
        logger.debug("token memo not stored: %s", exc)
        return
    _memo_written[local] = now


def forget_tokens(digests: list[str]) -> None:
    """Replace the memos of the tokens of ``digests`` by tombstones (a token revoked, its user
    changed): the fast path stops answering them at once; failures are logged."""
    if not digests:
        return
    _memo_written.clear()  # this process writes the memos again on their next authentication
    try:
        pipe = get_redis_connection("default").pipeline(transaction=True)
        for digest in digests:
            memo_key = _memo_key(digest)
            pipe.delete(memo_key)
            pipe.hset(memo_key, _TOMBSTONE_FIELD, 1)
            pipe.expire(memo_key, TOKEN_MEMO_BLOCK)
        pipe.execute()
    except redis.RedisError as exc:
        # The memo still expires within TOKEN_MEMO_TTL; say so, since a revocation is waiting on it.
        logger.warning("token memo not removed (expires within %d s): %s", TOKEN_MEMO_TTL, exc)


def forget_user(user_id: int) -> None:
    """Drop the memos of every token of a user (their rights changed: staff flag, memberships)."""
    forget_tokens(list(ApiToken.objects.filter(user_id=user_id).values_list("digest", flat=True)))


@cache
def _lookup_sql() -> str:
    """The join of token and user by the token's digest, selecting :func:`columns` of each, then the
    user's personal project (its id, or NULL before it is made) and memberships (``<project
    id>:<role>`` joined by ``,``): where the request may act, with no query more (built once per
    process)."""
    quote = connection.ops.quote_name
    user_model = get_user_model()
    user_id = quote(str(ApiToken._meta.get_field("user").column))
    digest = quote(str(ApiToken._meta.get_field("digest").column))
    caller = f"u.{quote(str(user_model._meta.pk.column))}"

    def column(model: type[Project | Membership], name: str) -> str:
        return quote(str(getattr(model._meta.get_field(name), "column", name)))

    roles = text_agg(f"m.{column(Membership, 'project')} || ':' || m.{column(Membership, 'role')}", ",")
    # Identifiers only, from the models' metadata, quoted; the digest is a query parameter.
    return (
        f"SELECT {columns(ApiToken, 't')}, {columns(user_model, 'u')}, "  # noqa: S608
        f"(SELECT p.{column(Project, 'id')} FROM {quote(Project._meta.db_table)} p "
        f"WHERE p.{column(Project, 'personal_of')} = {caller}), "
        f"(SELECT {roles} FROM {quote(Membership._meta.db_table)} m "
        f"WHERE m.{column(Membership, 'user')} = {caller}) "
        f"FROM {quote(ApiToken._meta.db_table)} t JOIN {quote(user_model._meta.db_table)} u "
        f"ON {caller} = t.{user_id} WHERE t.{digest} = %s"
    )


def _caller(user: AbstractBaseUser, personal_project: int | None, memberships: str | None) -> Caller:
    """The caller of the token query's row; a user without a personal project gets it made here."""
    if personal_project is None:
        # Imported here: apps.projects.acting imports apps.core.errors, whose import of DRF's views
        # loads this module (DRF's authentication classes setting).
        from apps.projects.acting import caller_of  # noqa: PLC0415

        return caller_of(user)
    pairs = (item.split(":") for item in memberships.split(",")) if memberships else ()
    roles = tuple(sorted((int(project), role) for project, role in pairs))
    return Caller(user.pk, bool(getattr(user, "is_staff", False)), personal_project, roles)


class FastTokenAuthentication(TokenAuthentication):
    """``Authorization: Token <secret>``, looked up by the secret's digest in one fixed SQL query,
    which also reads the caller's projects (into the request's context: where it may act)."""

    caller: Caller | None = None  # of the last authenticate_credentials (DRF makes one instance per request)

    def authenticate(self, request: Request) -> tuple[AbstractBaseUser, ApiToken] | None:
        found: tuple[AbstractBaseUser, ApiToken] | None = super().authenticate(request)
        if found is not None and found[1].read_only and request.method not in SAFE_METHODS:
            raise exceptions.PermissionDenied(
                f"This token is read-only: {request.method} is refused (only GET, HEAD and OPTIONS)."
            )
        if found is not None:
            request_context(request).caller = self.caller
        return found

    def authenticate_credentials(self, key: str) -> tuple[AbstractBaseUser, ApiToken]:
        found = fetch_prepared(_lookup_sql(), [token_digest(key)])
        if not found:
            raise exceptions.AuthenticationFailed("Invalid token.")
        row = found[0]
        split = len(ApiToken._meta.concrete_fields)
        token = instance_from_row(ApiToken, row[:split])
        if token.is_expired():
            raise exceptions.AuthenticationFailed("Token expired.")
        user = instance_from_row(get_user_model(), row[split:-2])
        if not user.is_active:
            raise exceptions.AuthenticationFailed("User inactive or deleted.")
        token.user = user
        self.caller = _caller(user, *row[-2:])
        remember_token(key, self.caller, expires_at=token.expires_at)
        return user, token
