"""API rate limits as fixed-window counters in Redis: one round trip and O(1) work per request.

DRF's ``UserRateThrottle`` keeps the timestamp of every request of the last window in one cache
entry and reads, unpickles, trims, pickles and writes that list back on every request: at the
default 6000/min an active user's list holds up to 6000 floats (about 54 KB each way, twice per
request). Here a request costs one pipelined ``INCR`` + ``EXPIRE`` of the window's counter.

Semantics: at most ``num_requests`` per calendar window of the rate's duration (a client may
spend two windows' worth across a boundary); a 429 says how long until the window turns. Rates
come from ``REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"]`` as for DRF's classes. Redis down: requests
are allowed (as with django-redis' ``IGNORE_EXCEPTIONS``), and that is logged.

The VM read fast path counts a caller it knows by id (from the token's memo) in the same counters,
inside its own Redis script: each throttle gives it its counter's key
(:meth:`WindowRateThrottle.known_user_counter`), and the request's context
(:mod:`apps.core.context`) then tells the throttle not to count that request again.
"""

import logging
import time
from typing import Any, ClassVar, Final, Literal, NamedTuple

import redis
from django.conf import settings
from django_redis import get_redis_connection
from rest_framework.request import Request
from rest_framework.settings import api_settings
from rest_framework.throttling import BaseThrottle, SimpleRateThrottle

from apps.core.context import request_context

logger = logging.getLogger(__name__)


def _counter_prefix(scope: str) -> str:
    return f"{settings.CACHE_KEY_PREFIX}:throttle:{scope}:"


#: Stands for the caller's user id in a :class:`KnownUserCounter`'s key (replaced where the id is known).
USER_MARK: Final = "{user}"


class KnownUserCounter(NamedTuple):
    """The counter a throttle increments for an authenticated caller known only by id.

    For a look-up that counts the caller itself, in Redis, before DRF runs (the VM read fast path,
    which learns the user id from the token's memo in the same script): ``key`` holds
    :data:`USER_MARK` where the user id goes; ``INCR`` it, ``EXPIRE`` it after ``ttl`` seconds,
    and the request is over the limit when the count exceeds ``limit``.
    """

    scope: str
    key: str
    limit: int
    ttl: int


class WindowRateThrottle(BaseThrottle):
    """A counter per client and window; subclasses say which rate (``scope``) and whom it counts:
    authenticated users by id, or anonymous callers by address (``counts``)."""

    scope = ""
    counts: ClassVar[Literal["users", "anonymous"]]

    def __init__(self) -> None:
        rate = api_settings.DEFAULT_THROTTLE_RATES.get(self.scope)
        self.num_requests, self.duration = SimpleRateThrottle.parse_rate(None, rate)  # type: ignore[arg-type]
        self.wait_seconds: float | None = None
        self._known: tuple[int, KnownUserCounter] | None = None

    def client_id(self, request: Request) -> str | None:
        """Who is counted; ``None`` means this class does not limit the request."""
        user = request.user
        if user and user.is_authenticated:
            return str(user.pk) if self.counts == "users" else None
        return self.get_ident(request) if self.counts == "anonymous" else None

    def _key(self, client: str, window: int) -> str:
        return f"{_counter_prefix(self.scope)}{client}:{window}"

    def known_user_counter(self, now: float) -> KnownUserCounter | None:
        """This throttle's counter at ``now`` for an authenticated caller known by id; None when it
        does not count them (no rate, or a throttle of anonymous callers). Made once per window."""
        if self.num_requests is None or self.duration is None or self.counts != "users":
            return None
        window = int(now // self.duration)
        known = self._known  # (window, counter), replaced whole: threads share the instance
        if known is None or known[0] != window:
            counter = KnownUserCounter(
                self.scope, self._key(USER_MARK, window), self.num_requests, self.duration + 1
            )
            known = self._known = (window, counter)
        return known[1]

    def allow_request(self, request: Request, view: Any) -> bool:
        if self.num_requests is None or self.duration is None:
            return True
        if self.scope in request_context(request._request).counted_scopes:
            return True  # counted, and found under the limit, by the fast path's look-up
        client = self.client_id(request)
        if client is None:
            return True
        now = time.time()
        window = int(now // self.duration)
        key = self._key(client, window)
        try:
            pipe = get_redis_connection("default").pipeline(transaction=False)
            pipe.incr(key)
            pipe.expire(key, self.duration + 1)
            count, _ = pipe.execute()
        except redis.RedisError as exc:
            logger.warning("rate limit not checked, Redis did not answer: %s", exc)
            return True
        if int(count) <= self.num_requests:
            return True
        self.wait_seconds = (window + 1) * self.duration - now
        return False

    def wait(self) -> float | None:
        return self.wait_seconds


class UserWindowThrottle(WindowRateThrottle):
    """Authenticated users by id (rate ``user``); anonymous requests are left to the anon limit."""

    scope = "user"
    counts = "users"


class AnonWindowThrottle(WindowRateThrottle):
    """Anonymous requests by client address (rate ``anon``)."""

    scope = "anon"
    counts = "anonymous"
