"""API rate limits: fixed-window counters in Redis, 429 ``throttled`` with Retry-After past the rate."""

from typing import Any

import pytest
import redis

pytestmark = pytest.mark.django_db


@pytest.fixture
def tight_rates(settings: Any) -> None:
    """Rates of a few requests an hour, counted from zero (this process's counters are removed)."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    for found in client.scan_iter(f"{settings.CACHE_KEY_PREFIX}:throttle:*", count=1000):
        client.delete(found)
    rest = dict(settings.REST_FRAMEWORK)
    rest["DEFAULT_THROTTLE_RATES"] = {**rest["DEFAULT_THROTTLE_RATES"], "user": "3/hour", "anon": "2/hour"}
    settings.REST_FRAMEWORK = rest


def test_a_user_past_the_rate_gets_429_with_retry_after(tight_rates, api, other_api):
    assert [api.get("/api/v1/users/me/").status_code for _ in range(3)] == [200, 200, 200]
    refused = api.get("/api/v1/users/me/")
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "throttled"
    assert 0 < int(refused["Retry-After"]) <= 3600
    assert other_api.get("/api/v1/users/me/").status_code == 200  # counted per user


def test_anonymous_clients_are_counted_by_address(tight_rates, client):
    statuses = [client.get("/api/v1/docs/").status_code for _ in range(3)]  # a public page
    assert statuses == [200, 200, 429]


def test_redis_down_lets_requests_through(tight_rates, api, settings):
    settings.CACHES = {"default": dict(settings.CACHES["default"], LOCATION="redis://127.0.0.1:1/0")}
    assert {api.get("/api/v1/users/me/").status_code for _ in range(5)} == {200}
