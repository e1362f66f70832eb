"""Streams tests: the server fixture (``tests.streams_server``), a migration to stream and what a
node publishes."""

import json
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from django.conf import settings

from apps.migrations.models import Migration
from apps.vms.models import VM
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


@pytest.fixture
def make_migration(make_node: Callable[..., Any], make_image: Callable[..., Any]) -> Callable[..., Migration]:
    nodes: list[Any] = []

    def make(owner: Any, *, status: str = "transferring", name: str = "moving") -> Migration:
        if not nodes:
            nodes.extend([make_node("stream-a"), make_node("stream-b")])
            nodes.append(make_image("stream-image"))
        source, dest, image = nodes
        vm = VM.objects.create(
            owner=owner,
            name=name,
            image=image,
            node=source,
            state="running",
            vcpus=1,
            memory_mb=256,
            disk_gb=1,
        )
        return Migration.objects.create(
            vm=vm, source_node=source, dest_node=dest, status=status, phase="memory"
        )

    return make
