"""Test helpers for DWCP: shared constants, test files, and a proxy that cuts or corrupts traffic."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

SECRET = "test-secret-0123456789abcdef"
SOURCE = "node-a"
DEST = "node-b"
MiB = 1024 * 1024


def write_mixed_file(path: Path, size: int, seed: int = 1) -> Path:
    """Random, text-like and zero regions, like a VM disk: every codec gets used."""
    rng = random.Random(seed)
    words = [bytes(rng.choice(b"abcdefghij klmnop\n") for _ in range(8)) for _ in range(256)]
    with path.open("wb") as handle:
        written = 0
        block = 0
        while written < size:
            length = min(MiB, size - written)
            kind = block % 3
            if kind == 0:
                data = rng.randbytes(length)
            elif kind == 1:
                data = b"".join(rng.choice(words) for _ in range(length // 8 + 1))[:length]
            else:
                data = bytes(length)
            handle.write(data)
            written += length
            block += 1
    return path


class FaultyProxy:
    """TCP proxy on 127.0.0.1 that can cut all connections after N upstream bytes or flip one byte."""

    def __init__(
        self, target: tuple[str, int], *, cut_after: int | None = None, flip_at: int | None = None
    ) -> None:
        self.target = target
        self.cut_after = cut_after
        self.flip_at = flip_at
        self.upstream_bytes = 0
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, upstream: bool) -> None:
        try:
            while True:
                data = bytearray(source.recv(65536))
                if not data:
                    sink.shutdown(socket.SHUT_WR)
                    return
                if upstream:
                    with self._lock:
                        start = self.upstream_bytes
                        self.upstream_bytes += len(data)
                    if self.flip_at is not None and start <= self.flip_at < start + len(data):
                        data[self.flip_at - start] ^= 0xFF
                    if self.cut_after is not None and self.upstream_bytes > self.cut_after:
                        self.close()
                        return
                sink.sendall(data)
        except OSError:
            return

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(MiB), b""):
            digest.update(block)
    return digest.hexdigest()


def random_file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


# The relay forwards at most this many bytes a second per direction, so transfers last long enough
# to be cut in the middle.
LINK_BYTES_PER_SECOND = 6 * MiB


class Link:
    """A TCP relay on 127.0.0.1 standing for the network between two nodes. ``reset()`` kills every
    connection with an RST (a peer's socket reset); ``blackhole()`` silently drops everything,
    new connections included, until ``restore()`` (a link down / firewall drop)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.forwarded = 0
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._up = threading.Event()
        self._up.set()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._sockets.append(client)
            if not self._up.is_set():
                continue  # a SYN into the void: held open, never answered
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._sockets.append(upstream)
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                self._up.wait()
                with self._lock:
                    dead = source not in self._sockets
                    self.forwarded += len(data)
                if dead:
                    return
                sink.sendall(data)
                time.sleep(len(data) / LINK_BYTES_PER_SECOND)
            sink.shutdown(socket.SHUT_WR)

    def _kill_all(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()  # RST

    def reset(self) -> None:
        self._kill_all()

    def blackhole(self) -> None:
        self._up.clear()

    def restore(self) -> None:
        # What was carried during the outage is gone; the ends have given those connections up.
        self._kill_all()
        self._up.set()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # close() alone does not wake accept()
        self._listener.close()
        self._kill_all()
        self._up.set()


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
