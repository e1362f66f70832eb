"""Streams tests: the server fixture (``tests.streams_server``), the events URL and what a source
node publishes (migrations: ``make_migration`` of tests/conftest.py)."""

import json
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from django.conf import settings

from tests.streams_server import launch_streams
from workers import contract

__all__ = ["launch_streams"]


@pytest.fixture
def streams(launch_streams: Callable[..., str]) -> str:
    return launch_streams()


def events_url(base: str, migration: Any) -> str:
    return f"{base}/api/v1/migrations/{migration.pk}/events/"


def publish_progress(migration: Any, **fields: float | str) -> None:
    """What a source node's publisher writes: the progress hash and the same snapshot on the channel."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    snapshot = {"updated": time.time(), **fields}
    key = contract.MIGRATION_PROGRESS_KEY.format(id=migration.pk)
    client.hset(key, mapping={name: str(value) for name, value in snapshot.items()})
    client.publish(contract.MIGRATION_EVENTS_CHANNEL.format(id=migration.pk), json.dumps(snapshot))
    client.close()
