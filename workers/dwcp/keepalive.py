"""Keepalives and silence detection for the connections of a file transfer (both ends).

A file's receiver has nothing to say while data flows, and a sender throttled by its bandwidth limit
may send nothing for seconds: without keepalives a link that silently drops everything (a firewall,
a pulled cable) would only show after TCP's minutes of retransmissions. So each end sends an ACK on
every connection it watches at least every ``TUNNEL_KEEPALIVE_SECONDS`` (``try_send``: never blocks,
skipped while a writer holds the connection, whose data then proves it alive) and calls
``on_silent`` for a connection whose reader has waited ``TUNNEL_LINK_SILENCE_SECONDS`` for a frame.
The ACK's sequence number is what ``position()`` returns (the receiver: chunks held; informative).

Invariant: once ``remove(channel)`` returned no ACK is sent on it, so a connection handed back to its
pool never carries a stray ACK into the next transfer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import limits
from .errors import ProtocolError
from .frames import Frame, FrameType, make_frame
from .transport import Channel

# How often the watch sends keepalives and looks for silent connections.
TICK_SECONDS = 0.1


@dataclass(slots=True)
class _Watched:
    last_heard: float
    last_sent: float
    receiving: bool = False  # its reader waits on the socket (not on the disk or the codec pool)


class LinkWatch:
    """Keepalives on, and silence detection for, a set of connections; one ticker thread."""

    def __init__(
        self, on_silent: Callable[[Channel, float], None], position: Callable[[], int] = lambda: 0
    ) -> None:
        self._on_silent = on_silent
        self._position = position
        self._lock = threading.Lock()
        self._watched: dict[Channel, _Watched] = {}
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._tick, name="dwcp-keepalive", daemon=True)
        self._thread.start()

    def add(self, channel: Channel) -> None:
        now = time.monotonic()
        with self._lock:
            self._watched[channel] = _Watched(now, now)

    def remove(self, channel: Channel) -> None:
        with self._lock:  # the ticker sends under this lock: nothing is sent on it after this
            self._watched.pop(channel, None)

    def receive(self, channel: Channel) -> Frame | None:
        """``channel.receive()``, timed: a wait longer than the silence limit calls ``on_silent``."""
        with self._lock:
            watched = self._watched.get(channel)
            if watched is not None:
                watched.last_heard, watched.receiving = time.monotonic(), True
        try:
            return channel.receive()
        finally:
            with self._lock:
                if watched is not None:
                    watched.last_heard, watched.receiving = time.monotonic(), False

    def stop(self) -> None:
        self._stopped.set()
        with self._lock:
            self._watched.clear()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=1.0)

    def _tick(self) -> None:
        while not self._stopped.wait(TICK_SECONDS):
            now = time.monotonic()
            silent: list[tuple[Channel, float]] = []
            with self._lock:
                for channel, watched in list(self._watched.items()):
                    quiet = now - watched.last_heard
                    if watched.receiving and quiet > limits.TUNNEL_LINK_SILENCE_SECONDS:
                        silent.append((channel, quiet))
                        del self._watched[channel]
                        continue
                    if now - watched.last_sent < limits.TUNNEL_KEEPALIVE_SECONDS:
                        continue
                    try:
                        if channel.try_send(make_frame(FrameType.ACK, seq_or_offset=self._position())):
                            watched.last_sent = now
                    except ProtocolError:
                        watched.last_sent = now  # not streaming now (END sent, RESULT answered)
                    except OSError:
                        watched.last_sent = now  # broken: its reader sees that
            for channel, quiet in silent:
                self._on_silent(channel, quiet)
