"""The two nodes' memory-check messages, through the real Redis."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from django.conf import settings

from workers.node.migration import memory_check
from workers.node.migration.memory_check import Verdict
from workers.qemu.memory import MemoryDigest


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(settings.REDIS_URL)
    yield connection
    connection.close()


@pytest.fixture
def migration_id(client: redis.Redis) -> Iterator[str]:
    value = str(uuid.uuid4())
    yield value
    client.delete(*(f"novacron:migration:{value}:memory:{name}" for name in ("source", "verdict")))


def test_an_offer_reaches_a_waiting_destination(client: redis.Redis, migration_id: str):
    digest = MemoryDigest((1, 2, 3))
    received: list[memory_check.Offer | None] = []
    waiter = threading.Thread(
        target=lambda: received.append(memory_check.wait_offer(client, migration_id, 10))
    )
    waiter.start()
    time.sleep(0.2)
    assert memory_check.offer(client, migration_id, digest, 5)
    waiter.join(10)
    assert received == [memory_check.Offer(digest)]


def test_a_source_that_does_not_check_says_so_in_a_message_that_expires(
    client: redis.Redis, migration_id: str
):
    assert memory_check.offer(client, migration_id, None, 5)
    assert 0 < client.ttl(f"novacron:migration:{migration_id}:memory:source") <= memory_check.KEY_TTL_SECONDS
    assert memory_check.wait_offer(client, migration_id, 5) == memory_check.Offer(None)


def test_no_offer_in_time_is_none(client: redis.Redis, migration_id: str):
    started = time.monotonic()
    assert memory_check.wait_offer(client, migration_id, 1) is None
    assert time.monotonic() - started < 3


@pytest.mark.parametrize("raw", ["not json", '["a list"]', '{"other": 1}', '{"digest": [1, 2]}'])
def test_a_malformed_offer_is_a_value_error(client: redis.Redis, migration_id: str, raw: str):
    client.rpush(f"novacron:migration:{migration_id}:memory:source", raw)
    with pytest.raises(ValueError):
        memory_check.wait_offer(client, migration_id, 5)


def test_verdicts_go_back_and_unknown_ones_count_as_none(client: redis.Redis, migration_id: str):
    assert memory_check.answer(client, migration_id, Verdict.MISMATCH, 5)
    assert memory_check.wait_verdict(client, migration_id, 5) is Verdict.MISMATCH
    client.rpush(f"novacron:migration:{migration_id}:memory:verdict", "maybe")
    assert memory_check.wait_verdict(client, migration_id, 5) is None


def test_redis_away_gives_up_after_the_timeout(migration_id: str):
    away = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)  # nothing listens on port 1
    started = time.monotonic()
    assert not memory_check.offer(away, migration_id, MemoryDigest((1,)), 1)
    assert memory_check.wait_verdict(away, migration_id, 1) is None
    # Each call gives up once its timeout has passed (plus redis-py's own retries of the last try).
    assert time.monotonic() - started < 15
