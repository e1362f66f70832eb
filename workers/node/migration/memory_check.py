"""The memory check at a live migration's switch: the two nodes' exchange through Redis.

When QEMU reports the migration complete both copies of the guest are paused. The source offers
the digest of its RAM (or says it does not check); the destination compares it with its own before
it resumes and answers with a verdict. On ``mismatch`` the destination has already stopped its copy,
so the source may resume its own: the guest runs on exactly one node either way. Each message is a
one-element list (RPUSH, read by a blocking BLPOP) that expires after ``KEY_TTL_SECONDS``.

A node whose messages cannot pass (Redis away beyond the timeout) behaves as before the check
existed: the destination resumes unverified and says so in its report; the source waits for the
control plane's decision. Each side waits for the other's message ``memory_check_wait`` seconds.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from enum import StrEnum

import redis

from workers import contract
from workers.qemu import QemuError
from workers.qemu.memory import SECONDS_PER_GIB, MemoryDigest

logger = logging.getLogger(__name__)

KEY_TTL_SECONDS = 600
RETRY_SECONDS = 0.5
# How long one side waits for the other's message: at least this, otherwise the time to read the
# guest's RAM twice.
MEMORY_CHECK_MIN_WAIT = 30.0


def memory_check_wait(memory_mb: int) -> float:
    """Seconds one side of the memory check waits for the other's message."""
    return max(MEMORY_CHECK_MIN_WAIT, 2 * SECONDS_PER_GIB * memory_mb / 1024)


class MemoryMismatch(QemuError):
    """The guest's RAM differed between source and destination at the switch.

    ``cause`` ranks the report (``contract.FAILURE_CAUSES``): the destination measured the difference,
    the source only relays the destination's verdict.
    """

    def __init__(self, message: str, *, cause: contract.FailureCause) -> None:
        super().__init__(message)
        self.cause: contract.FailureCause = cause


class Verdict(StrEnum):
    MATCH = "match"
    MISMATCH = "mismatch"
    SKIPPED = "skipped"  # the source does not check (its setting)
    UNVERIFIED = "unverified"  # the destination did not receive the source's digest in time


@dataclass(frozen=True)
class Offer:
    """What the source sent: its digest, or None when it does not check."""

    digest: MemoryDigest | None


def _key(migration_id: str, name: str) -> str:
    return f"novacron:migration:{migration_id}:memory:{name}"


def _push(client: redis.Redis, key: str, value: str, timeout: float) -> bool:
    """Leave ``value`` at ``key``, retrying through Redis errors for ``timeout`` s; False if it failed."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            pipe = client.pipeline()
            pipe.delete(key)
            pipe.rpush(key, value)
            pipe.expire(key, KEY_TTL_SECONDS)
            pipe.execute()
            return True
        except redis.RedisError as exc:
            logger.warning("memory check: writing %s: %s", key, exc)
            if time.monotonic() + RETRY_SECONDS > deadline:
                return False
            time.sleep(RETRY_SECONDS)


def _pop(client: redis.Redis, key: str, timeout: float) -> str | None:
    """The message at ``key``, waiting up to ``timeout`` s through Redis errors; None if none came."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            found = client.blpop([key], timeout=max(1, int(min(left, 5))))
        except redis.RedisError as exc:
            logger.warning("memory check: waiting for %s: %s", key, exc)
            time.sleep(RETRY_SECONDS)
            continue
        if found is not None:
            value = found[1]
            return value.decode() if isinstance(value, bytes) else str(value)
    return None


def offer(client: redis.Redis, migration_id: str, digest: MemoryDigest | None, timeout: float) -> bool:
    payload = {"digest": digest.to_json() if digest is not None else None}
    return _push(client, _key(migration_id, "source"), json.dumps(payload), timeout)


def wait_offer(client: redis.Redis, migration_id: str, timeout: float) -> Offer | None:
    """The source's offer, or None when none arrived in time. A malformed one raises ValueError."""
    raw = _pop(client, _key(migration_id, "source"), timeout)
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"the source's memory digest is not JSON: {exc}") from None
    if not isinstance(data, dict) or "digest" not in data:
        raise ValueError("the source's memory digest message has no digest field")
    return Offer(None if data["digest"] is None else MemoryDigest.from_json(data["digest"]))


def answer(client: redis.Redis, migration_id: str, verdict: Verdict, timeout: float) -> bool:
    return _push(client, _key(migration_id, "verdict"), verdict.value, timeout)


def wait_verdict(client: redis.Redis, migration_id: str, timeout: float) -> Verdict | None:
    raw = _pop(client, _key(migration_id, "verdict"), timeout)
    if raw is None:
        return None
    try:
        return Verdict(raw)
    except ValueError:
        logger.warning("memory check of %s: unknown verdict %r", migration_id, raw)
        return None
