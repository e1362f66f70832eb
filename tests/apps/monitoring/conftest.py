"""Fixtures of the monitoring tests: the real Redis (test database) with this run's keys emptied."""

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from django.conf import settings

from apps.monitoring.keys import API_LOG_DROPPED, API_LOG_LIST, LAST_SAMPLE, REQUEST_STATS, key


@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(settings.REDIS_URL)
    names = [key(name) for name in (API_LOG_LIST, API_LOG_DROPPED, REQUEST_STATS, LAST_SAMPLE)]
    client.delete(*names)
    yield client
    client.delete(*names)


@pytest.fixture
def monitoring(settings: Any) -> dict[str, Any]:
    """``settings.MONITORING``, restored after the test (pytest-django's settings fixture)."""
    settings.MONITORING = dict(settings.MONITORING)
    return settings.MONITORING
