"""A token bucket shared by all streams of one transfer, whose rate can change while it runs."""

from __future__ import annotations

import threading
import time

# Burst allowance: this many seconds of traffic may go out back to back after an idle period;
# short enough that a 1-second measurement window sees the configured rate.
BURST_SECONDS = 0.05
# Sleepers re-check at least this often, so a raised limit (or a cancel) takes effect quickly.
MAX_SLEEP_SECONDS = 0.05


class TokenBucket:
    """``acquire(n)`` blocks until ``n`` bytes may be sent at ``rate`` bytes/s (None = unlimited)."""

    def __init__(self, rate_bytes_per_second: float | None = None) -> None:
        self._lock = threading.Lock()
        self._rate = rate_bytes_per_second
        self._tokens = 0.0
        self._stamp = time.monotonic()
        self._closed = threading.Event()

    @property
    def rate(self) -> float | None:
        return self._rate

    def set_rate(self, rate_bytes_per_second: float | None) -> None:
        if rate_bytes_per_second is not None and rate_bytes_per_second <= 0:
            raise ValueError("a bandwidth limit must be positive (or None for unlimited)")
        with self._lock:
            self._refill(time.monotonic())
            self._rate = rate_bytes_per_second

    def close(self) -> None:
        """Wake every waiter; used on cancellation."""
        self._closed.set()

    def _refill(self, now: float) -> None:
        if self._rate is not None:
            burst = self._rate * BURST_SECONDS
            self._tokens = min(burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now

    def acquire(self, count: int) -> None:
        """Take ``count`` tokens, going into debt and sleeping it off (so big frames pass too)."""
        with self._lock:
            self._refill(time.monotonic())
            if self._rate is None:
                return
            self._tokens -= count
        while not self._closed.is_set():
            with self._lock:
                self._refill(time.monotonic())
                if self._rate is None or self._tokens >= 0:
                    return
                wait = -self._tokens / self._rate
            self._closed.wait(min(wait, MAX_SLEEP_SECONDS))
