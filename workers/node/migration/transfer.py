"""One outgoing transfer on the source: what it needs, the progress it publishes, the knobs it polls.

Progress goes to the Redis hash and channel of ``contract.MIGRATION_PROGRESS_KEY`` /
``MIGRATION_EVENTS_CHANNEL``, coalesced to a few updates a second with a percent that never goes
back. The knobs (``contract.MIGRATION_CONTROL_KEY``) are what an operator changes while it runs:
bandwidth, cancel (raises ``MigrationAborted``), force-complete.
"""

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from workers import contract
from workers.dwcp import Progress, TransferControl
from workers.qemu import VmSpec

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.2  # control knobs and QEMU progress; progress is published at most every PUBLISH_SECONDS
PUBLISH_SECONDS = 0.25
PROGRESS_TTL_SECONDS = 7 * 24 * 3600  # the control side shortens it once the migration ended


class MigrationAborted(Exception):
    """The control plane cancelled the migration while this node was working on it."""


@dataclass
class Publisher:
    """Writes the progress hash and channel, coalesced to a few updates a second, percent monotonic.

    ``fields`` also keeps figures the source reports at the end (QMP event times, QEMU's own).
    """

    client: redis.Redis
    migration_id: str
    fields: dict[str, Any] = field(default_factory=dict)
    percent: float = 0.0
    last: float = 0.0

    def update(self, *, force: bool = False, **values: Any) -> None:
        self.fields.update({key: value for key, value in values.items() if value is not None})
        if "percent" in values and values["percent"] is not None:
            self.percent = max(self.percent, min(float(values["percent"]), 100.0))
        now = time.monotonic()
        if not force and now - self.last < PUBLISH_SECONDS:
            return
        self.last = now
        snapshot = {**self.fields, "percent": round(self.percent, 2), "updated": time.time()}
        key = contract.MIGRATION_PROGRESS_KEY.format(id=self.migration_id)
        try:
            pipe = self.client.pipeline()
            pipe.hset(key, mapping={name: str(value) for name, value in snapshot.items()})
            pipe.expire(key, PROGRESS_TTL_SECONDS)
            pipe.publish(contract.MIGRATION_EVENTS_CHANNEL.format(id=self.migration_id), json.dumps(snapshot))
            pipe.execute()
        except redis.RedisError as exc:
            logger.warning("migration %s: progress not published: %s", self.migration_id, exc)


class Knobs:
    """The control hash, polled: bandwidth, cancel, force-complete."""

    def __init__(self, client: redis.Redis, migration_id: str, control: TransferControl) -> None:
        self.client = client
        self.key = contract.MIGRATION_CONTROL_KEY.format(id=migration_id)
        self.control = control
        self.bandwidth: float | None = control.bandwidth_limit_mbps
        self.force_complete = False

    def poll(self) -> None:
        try:
            raw = self.client.hgetall(self.key)
        except redis.RedisError as exc:
            logger.warning("control knobs unreadable: %s", exc)
            return
        knobs = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in raw.items()
        }
        if knobs.get("cancel") == "1":
            self.control.cancel()
            raise MigrationAborted("cancelled by the control plane")
        if "bandwidth_limit_mbps" in knobs:
            text = knobs["bandwidth_limit_mbps"]
            bandwidth = float(text) if text else None
            if bandwidth != self.bandwidth:
                self.control.set_bandwidth_limit(bandwidth)
                self.bandwidth = bandwidth
        self.force_complete = knobs.get("force_complete") == "1"


@dataclass
class SendJob:
    """Everything one outgoing transfer needs."""

    migration_id: str
    spec: VmSpec
    address: str
    tickets: contract.Tickets
    targets: contract.Targets
    options: contract.TransferOptions
    control: TransferControl
    knobs: Knobs
    publisher: Publisher

    @property
    def streams(self) -> int:
        return int(self.options.get("streams") or 4)


class ProgressCallback:
    """A DWCP progress reporter that hands each update to a function."""

    def __init__(self, callback: Callable[[Progress], None]) -> None:
        self.callback = callback

    def report(self, progress: Progress) -> None:
        self.callback(progress)
