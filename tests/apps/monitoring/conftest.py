"""Fixtures of the monitoring tests: the real Redis (test database) with this run's keys emptied."""

import importlib
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


@pytest.fixture(autouse=True)
def default_alert_rules(request: pytest.FixtureRequest) -> None:
    """The default rules the data migrations load, back after a transactional test flushed them.

    pytest-django runs transactional tests after the others and empties every table between them, so
    a later test would find no rules without this.
    """
    if "live_server" not in request.fixturenames and "transactional_db" not in request.fixturenames:
        return
    request.getfixturevalue("transactional_db")
    from apps.monitoring.models import AlertRule

    for module in ("0004_default_alert_rules", "0005_migration_operator_rule"):
        loader = importlib.import_module(f"apps.monitoring.migrations.{module}")
        for rule in loader.DEFAULT_RULES:
            AlertRule.objects.get_or_create(name=rule["name"], defaults=rule)
