"""Live migration progress and control knobs in Redis (keys in ``workers.contract``).

The source node writes the progress hash; the API reads it while a migration runs and folds it into
the row when it ends. The control hash carries what an operator changes while it runs (bandwidth,
cancel, force-complete); the source polls it. The events channel carries the source's progress
snapshots and, from the control side, each status change (:func:`publish_status`, a JSON object with
``"event": "status"``), which the streams service (``apps.streams``) passes on to its clients.
"""

import json
from collections.abc import Mapping
from typing import Any, Final, Unpack

import redis

from workers import contract

_NUMERIC = frozenset(contract.MIGRATION_PROGRESS_FIELDS) - contract.MIGRATION_PROGRESS_TEXT_FIELDS
_MOVEMENT_KEY = "novacron:migration:{id}:watchdog"
# An ended migration's progress hash stays this long (an SSE client may still be reading); its
# figures are in the row by then. Without this, every migration's keys stayed for days (the soak's
# Redis grew by ~3 MiB in 10 minutes of back-and-forth migrations).
ENDED_TTL_SECONDS = 60
STATUS_EVENT: Final = "status"  # the "event" of a status change on the events channel


def read(client: redis.Redis, migration_id: str) -> dict[str, Any]:
    """The latest progress of a migration (empty when the source has reported none)."""
    try:
        raw = client.hgetall(contract.MIGRATION_PROGRESS_KEY.format(id=migration_id))
    except redis.RedisError:
        return {}
    return parse(raw)


def parse(raw: Mapping[Any, Any]) -> dict[str, Any]:
    """The progress fields of a hash or a published snapshot (numbers as floats; others dropped)."""
    progress: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.decode() if isinstance(key, bytes) else str(key)
        text = value.decode() if isinstance(value, bytes) else str(value)
        if name in _NUMERIC:
            try:
                progress[name] = float(text)
            except ValueError:
                continue
        elif name in contract.MIGRATION_PROGRESS_TEXT_FIELDS:
            progress[name] = text
    return progress


def publish_status(
    client: redis.Redis, migration_id: str, *, status: str, phase: str, error: str, history: int
) -> None:
    """Announce a status change on the events channel (``history``: the MigrationEvent's id)."""
    message = {"event": STATUS_EVENT, "status": status, "phase": phase, "error": error, "history": history}
    client.publish(contract.MIGRATION_EVENTS_CHANNEL.format(id=migration_id), json.dumps(message))


def set_control(client: redis.Redis, migration_id: str, **knobs: Unpack[contract.MigrationControl]) -> None:
    """Set knobs for the source to pick up (``None`` clears a bandwidth limit)."""
    mapping: dict[Any, Any] = {
        key: ("" if value is None else str(int(value) if isinstance(value, bool) else value))
        for key, value in knobs.items()
    }
    key = contract.MIGRATION_CONTROL_KEY.format(id=migration_id)
    pipe = client.pipeline()
    pipe.hset(key, mapping=mapping)
    pipe.expire(key, 7 * 24 * 3600)
    pipe.execute()


def note_movement(client: redis.Redis, migration_id: str) -> bool:
    """True when the transferred byte counts moved since the previous call (for the watchdog)."""
    progress = read(client, migration_id)
    fingerprint = ":".join(
        str(int(progress.get(name, 0))) for name in ("wire_bytes", "memory_processed", "disk_processed")
    )
    key = _MOVEMENT_KEY.format(id=migration_id)
    previous = client.getset(key, fingerprint)
    client.expire(key, 24 * 3600)
    previous_text = previous.decode() if isinstance(previous, bytes) else previous
    return previous_text is not None and previous_text != fingerprint


def forget(client: redis.Redis, migration_id: str) -> None:
    """A migration ended and its source has reported for the last time: drop its keys soon."""
    pipe = client.pipeline()
    pipe.expire(contract.MIGRATION_PROGRESS_KEY.format(id=migration_id), ENDED_TTL_SECONDS)
    pipe.delete(contract.MIGRATION_CONTROL_KEY.format(id=migration_id), _MOVEMENT_KEY.format(id=migration_id))
    pipe.execute()
