"""API rate limits as fixed-window counters in Redis: one round trip and O(1) work per request.

DRF's ``UserRateThrottle`` keeps the timestamp of every request of the last window in one cache
entry and reads, unpickles, trims, pickles and writes that list back on every request: at the
default 6000/min an active user's list holds up to 6000 floats (about 54 KB each way, twice per
request). Here a request costs one pipelined ``INCR`` + ``EXPIRE`` of the window's counter.

Semantics: at most ``num_requests`` per calendar window of the rate's duration (a client may
spend two windows' worth across a boundary); a 429 says how long until the window turns. Rates
come from ``REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"]`` as for DRF's classes. Redis down: requests
are allowed (as with django-redis' ``IGNORE_EXCEPTIONS``), and that is logged.
"""

import logging
import time
from typing import Any, NamedTuple

import redis
from django.conf import settings
from django_redis import get_redis_connection
from rest_framework.request import Request
from rest_framework.settings import api_settings
from rest_framework.throttling import BaseThrottle, SimpleRateThrottle

logger = logging.getLogger(__name__)


def _counter_prefix(scope: str) -> str:
    return f"{settings.CACHE_KEY_PREFIX}:throttle:{scope}:"


class UserWindow(NamedTuple):
    """The authenticated users' current window: counter ``<key_prefix><user id>:<number>``."""

    key_prefix: str
    number: int
    seconds: int
    limit: int


#: Set on a Django request whose user the VM read fast path has already counted in this window
#: (``apps/vms/middleware.py``): the ``user`` throttle lets it through without counting it again.
COUNTED_ATTR = "novacron_user_counted"


def user_window(now: float) -> UserWindow | None:
    """The ``user`` rate's window at ``now`` (None: users are not rate limited); for the fast path."""
    rate = api_settings.DEFAULT_THROTTLE_RATES.get(UserWindowThrottle.scope)
    num_requests, duration = SimpleRateThrottle.parse_rate(None, rate)  # type: ignore[arg-type]
    if num_requests is None or duration is None:
        return None
    return UserWindow(_counter_prefix(UserWindowThrottle.scope), int(now // duration), duration, num_requests)


class WindowRateThrottle(BaseThrottle):
    """A counter per client and window; subclasses say which rate (``scope``) and which client."""

    scope = ""

    def __init__(self) -> None:
        rate = api_settings.DEFAULT_THROTTLE_RATES.get(self.scope)
        self.num_requests, self.duration = SimpleRateThrottle.parse_rate(None, rate)  # type: ignore[arg-type]
        self.wait_seconds: float | None = None

    def client_id(self, request: Request) -> str | None:
        """Who is counted; ``None`` means this class does not limit the request."""
        raise NotImplementedError

    def allow_request(self, request: Request, view: Any) -> bool:
        if self.num_requests is None or self.duration is None:
            return True
        client = self.client_id(request)
        if client is None:
            return True
        now = time.time()
        window = int(now // self.duration)
        key = f"{_counter_prefix(self.scope)}{client}:{window}"
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

    def client_id(self, request: Request) -> str | None:
        user = request.user
        if getattr(request._request, COUNTED_ATTR, False):
            return None  # counted by the fast path's look-up (and found under the limit)
        return str(user.pk) if user and user.is_authenticated else None


class AnonWindowThrottle(WindowRateThrottle):
    """Anonymous requests by client address (rate ``anon``)."""

    scope = "anon"

    def client_id(self, request: Request) -> str | None:
        user = request.user
        return None if user and user.is_authenticated else self.get_ident(request)
