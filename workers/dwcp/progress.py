"""Transfer progress: counters, a reporter interface, and the Redis and terminal reporters.

Stream threads only add to counters (``ProgressTracker.add``). A single ticker thread turns them
into ``Progress`` snapshots at most five times a second (``PROGRESS_INTERVAL_SECONDS``) and hands
them to a ``Reporter``; a slow or broken reporter therefore never slows the transfer down.
The Redis reporter writes a hash ``<prefix><transfer_id>`` and publishes the same JSON on the
channel ``<prefix><transfer_id>:events`` (the control plane subscribes there).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from . import limits

if TYPE_CHECKING:  # importing redis costs about a second of start-up; only the reporter needs it
    import redis
    from redis.typing import EncodableT, FieldT

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Progress:
    transfer_id: str
    phase: str  # "connecting", "transferring", "reconnecting", "verifying", "done", "failed", "cancelled"
    raw_bytes: int  # bytes of content delivered (holes, zeros and references included)
    wire_bytes: int  # bytes put on the wire, headers included
    total_bytes: int | None  # None for tunnels
    elapsed_seconds: float
    rate_bytes_per_second: float  # raw bytes per second, since the start
    eta_seconds: float | None
    codec_mix: dict[str, int] = field(default_factory=dict)  # raw bytes carried per codec
    # While a tunnel's link is cut (phase "reconnecting"): seconds since it went down.
    outage_seconds: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Reporter(Protocol):
    def report(self, progress: Progress) -> None: ...


class ProgressTracker:
    """Thread-safe counters for one transfer, reported by a ticker thread at a bounded rate."""

    def __init__(
        self,
        transfer_id: str,
        *,
        total_bytes: int | None,
        reporter: Reporter | None = None,
        interval: float = limits.PROGRESS_INTERVAL_SECONDS,
    ) -> None:
        self.transfer_id = transfer_id
        self.total_bytes = total_bytes
        self.phase = "connecting"
        self.outage_since: float | None = None  # monotonic start of a tunnel's current link outage
        self._reporter = reporter
        self._interval = max(interval, limits.PROGRESS_INTERVAL_SECONDS)
        self._lock = threading.Lock()
        self._raw = 0
        self._wire = 0
        self._mix: dict[str, int] = {}
        self._start = time.monotonic()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        if reporter is not None:
            self._thread = threading.Thread(
                target=self._tick, name=f"dwcp-progress-{transfer_id[:8]}", daemon=True
            )
            self._thread.start()

    def add(self, *, raw: int, wire: int, codec: str | None = None) -> None:
        with self._lock:
            self._raw += raw
            self._wire += wire
            if codec is not None and raw:
                self._mix[codec] = self._mix.get(codec, 0) + raw

    def snapshot(self) -> Progress:
        with self._lock:
            raw, wire, mix = self._raw, self._wire, dict(self._mix)
        elapsed = time.monotonic() - self._start
        rate = raw / elapsed if elapsed > 0 else 0.0
        eta = None
        if self.total_bytes is not None and rate > 0:
            eta = max(0.0, (self.total_bytes - raw) / rate)
        outage_since = self.outage_since
        outage = None if outage_since is None else round(time.monotonic() - outage_since, 1)
        return Progress(
            self.transfer_id, self.phase, raw, wire, self.total_bytes, elapsed, rate, eta, mix, outage
        )

    def _tick(self) -> None:
        while not self._stopped.wait(self._interval):
            self._emit()

    def _emit(self) -> None:
        if self._reporter is None:
            return
        try:
            self._reporter.report(self.snapshot())
        except Exception:  # a reporter must never break a transfer
            logger.exception("DWCP progress reporter failed")

    def finish(self, phase: str) -> Progress:
        """Stop the ticker and deliver one last snapshot with the final phase."""
        self.phase = phase
        self._stopped.set()
        if self._thread is not None:
            self._thread.join()
        self._emit()
        return self.snapshot()


class RedisProgressReporter:
    """Writes progress to the hash ``{prefix}{transfer_id}`` and publishes it on ``...:events``."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        key_prefix: str = "novacron:dwcp:",
        ttl_seconds: int = 24 * 3600,
    ) -> None:
        self._client = client
        self._prefix = key_prefix
        self._ttl = ttl_seconds

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> RedisProgressReporter:
        import redis  # noqa: PLC0415 - deferred, see the module imports

        return cls(redis.Redis.from_url(url), **kwargs)

    def key(self, transfer_id: str) -> str:
        return f"{self._prefix}{transfer_id}"

    def channel(self, transfer_id: str) -> str:
        return f"{self._prefix}{transfer_id}:events"

    def report(self, progress: Progress) -> None:
        import redis  # noqa: PLC0415 - already loaded by whoever built the client

        document = progress.as_dict()
        mapping: dict[FieldT, EncodableT] = {
            key: json.dumps(value) if isinstance(value, dict) else ("" if value is None else str(value))
            for key, value in document.items()
        }
        try:
            pipe = self._client.pipeline(transaction=False)
            pipe.hset(self.key(progress.transfer_id), mapping=mapping)
            pipe.expire(self.key(progress.transfer_id), self._ttl)
            pipe.publish(self.channel(progress.transfer_id), json.dumps(document))
            pipe.execute()
        except redis.RedisError as exc:
            logger.warning("DWCP progress for %s not written to Redis: %s", progress.transfer_id, exc)


class TerminalReporter:
    """A one-line progress bar on a terminal (the CLI uses it when stderr is a TTY)."""

    def __init__(self, stream: TextIO = sys.stderr, width: int = 30) -> None:
        self._stream = stream
        self._width = width

    def report(self, progress: Progress) -> None:
        total = progress.total_bytes or 0
        fraction = min(1.0, progress.raw_bytes / total) if total else 1.0
        filled = int(fraction * self._width)
        eta = f"{progress.eta_seconds:5.1f}s" if progress.eta_seconds is not None else "  -  "
        line = (
            f"\r[{'#' * filled}{'.' * (self._width - filled)}] {fraction:6.1%} "
            f"{progress.raw_bytes / 1e6:9.1f} MB  {progress.rate_bytes_per_second / 1e6:8.1f} MB/s  "
            f"wire {progress.wire_bytes / 1e6:9.1f} MB  eta {eta} {progress.phase:<12}"
        )
        self._stream.write(line)
        if progress.phase in ("done", "failed", "cancelled"):
            self._stream.write("\n")
        self._stream.flush()


class CallbackReporter:
    """Adapts a plain function to the ``Reporter`` interface."""

    def __init__(self, callback: Callable[[Progress], None]) -> None:
        self._callback = callback

    def report(self, progress: Progress) -> None:
        self._callback(progress)
