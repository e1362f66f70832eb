"""Handles the caller keeps on a running transfer: cancel it, change its bandwidth limit."""

from __future__ import annotations

import threading

from .ratelimit import TokenBucket


def mbps_to_bytes_per_second(mbps: float | None) -> float | None:
    return None if mbps is None else mbps * 1_000_000 / 8


class TransferControl:
    """Create one, pass it to ``send_file``/``open_tunnel``, and call it from any thread."""

    def __init__(self, *, bandwidth_limit_mbps: float | None = None) -> None:
        self.bucket = TokenBucket(mbps_to_bytes_per_second(bandwidth_limit_mbps))
        self.cancelled = threading.Event()

    def set_bandwidth_limit(self, mbps: float | None) -> None:
        """New limit in Mbit/s on the wire (None lifts it); applies to frames not yet sent."""
        self.bucket.set_rate(mbps_to_bytes_per_second(mbps))

    @property
    def bandwidth_limit_mbps(self) -> float | None:
        rate = self.bucket.rate
        return None if rate is None else rate * 8 / 1_000_000

    def cancel(self) -> None:
        self.cancelled.set()
        self.bucket.close()
