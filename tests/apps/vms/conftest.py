"""Fixtures of the VM app's tests: this process's API cache (and memos, counters) in the real Redis."""

from collections.abc import Callable, Iterator

import pytest
import redis
from django.conf import settings

# Headers that must match between two paths of a read (Date, the request id and the like are not compared).
COMPARED_HEADERS = (
    "Content-Type",
    "Content-Length",
    "Allow",
    "Vary",
    "ETag",
    "WWW-Authenticate",
    "X-Frame-Options",
    "X-Content-Type-Options",
    "Referrer-Policy",
    "Cross-Origin-Opener-Policy",
    "Set-Cookie",
)


def forget(*kinds: str) -> None:
    """Remove this process's Redis keys of ``kinds`` (``apicache``, ``authtoken``, ``throttle``...)."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    for kind in kinds:
        for found in client.scan_iter(f"{settings.CACHE_KEY_PREFIX}:{kind}:*", count=1000):
            client.delete(found)


@pytest.fixture
def forget_api_state() -> Iterator[Callable[..., None]]:
    """Cache entries, token memos and rate counters removed before and after the test."""
    forget("apicache", "authtoken", "throttle")
    yield forget
    forget("apicache", "authtoken", "throttle")
