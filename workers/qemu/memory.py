"""A digest of a paused guest's RAM, to prove a live migration delivered it whole.

QEMU 7.2 under TCG can lose a guest write during a live migration: a page written after its last
transfer is never marked dirty again, so the destination resumes with the older copy (measured on
this machine: about one migration in six through a DWCP tunnel, a guest kernel oops in some of
them; QEMU's stream itself arrives byte for byte). Comparing both sides' RAM while both are paused,
before the destination resumes, catches it.

The RAM is read with QMP ``pmemsave`` into a FIFO that a thread hashes as it arrives (nothing is
written to disk), in ``CHUNK_SIZE`` pieces so a mismatch can say how much differs. The ranges are
where the q35 machine maps RAM: all of it below 4 GiB up to 2816 MiB, else 2 GiB below and the rest
from 4 GiB.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import xxhash

from .errors import QemuError
from .qmp import QmpSession

CHUNK_SIZE = 1 << 20
Q35_ALL_LOW_LIMIT = 0xB0000000  # RAM below this size lies wholly below 4 GiB on q35
Q35_LOW_SPLIT = 0x80000000  # larger RAM: this much below 4 GiB, the rest above
HIGH_BASE = 1 << 32
# pmemsave runs in QEMU's main loop; through a 1 MiB pipe it moved about 1.7 GB/s here (128 MiB: 73 ms).
SECONDS_PER_GIB = 10.0
MIN_TIMEOUT = 30.0


def q35_ram_ranges(memory_mb: int) -> list[tuple[int, int]]:
    """(guest physical address, length) of the RAM of a q35 guest with ``memory_mb``."""
    if memory_mb <= 0:
        raise ValueError(f"memory_mb must be positive, not {memory_mb}")
    size = memory_mb << 20
    if size < Q35_ALL_LOW_LIMIT:
        return [(0, size)]
    return [(0, Q35_LOW_SPLIT), (HIGH_BASE, size - Q35_LOW_SPLIT)]


@dataclass(frozen=True)
class MemoryDigest:
    """xxh3-64 of each ``CHUNK_SIZE`` piece of guest RAM, range after range."""

    chunks: tuple[int, ...]

    def differing(self, other: MemoryDigest) -> int:
        """How many chunks differ (a length mismatch counts the extra chunks)."""
        pairs = zip(self.chunks, other.chunks, strict=False)
        return sum(1 for mine, theirs in pairs if mine != theirs) + abs(len(self.chunks) - len(other.chunks))

    def to_json(self) -> list[str]:
        return [f"{value:016x}" for value in self.chunks]

    @classmethod
    def from_json(cls, value: object) -> MemoryDigest:
        if not isinstance(value, list) or not all(
            isinstance(item, str) and len(item) == 16 for item in value
        ):
            raise ValueError("a memory digest is a list of 16-digit hex strings")
        return cls(tuple(int(item, 16) for item in value))


def memory_digest(qmp: QmpSession, memory_mb: int, *, scratch: Path | None = None) -> MemoryDigest:
    """Digest of the RAM of the (paused) guest behind ``qmp``; ``scratch`` holds the FIFO."""
    ranges = q35_ram_ranges(memory_mb)
    chunks: list[int] = []
    try:
        with tempfile.TemporaryDirectory(prefix="memdigest-", dir=scratch) as tmp:
            fifo = Path(tmp) / "ram.fifo"
            os.mkfifo(fifo, 0o600)
            for start, length in ranges:
                chunks += _read_range(qmp, fifo, start, length)
    except OSError as exc:
        raise QemuError(f"reading guest memory failed: {exc}") from exc
    return MemoryDigest(tuple(chunks))


def _read_range(qmp: QmpSession, fifo: Path, start: int, length: int) -> list[int]:
    digests: list[int] = []
    failure: list[BaseException] = []

    def reader() -> None:
        try:
            with open(fifo, "rb", buffering=0) as pipe:  # blocks until QEMU opens its end
                with contextlib.suppress(OSError):  # fewer wake-ups; the default 64 KiB works too
                    fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, CHUNK_SIZE)
                buffer = bytearray(CHUNK_SIZE)
                view = memoryview(buffer)
                while True:
                    filled = 0
                    while filled < CHUNK_SIZE:
                        got = pipe.readinto(view[filled:])
                        if not got:
                            break
                        filled += got
                    if filled:
                        digests.append(xxhash.xxh3_64_intdigest(view[:filled]))
                    if filled < CHUNK_SIZE:
                        return
        except OSError as exc:
            failure.append(exc)

    thread = threading.Thread(target=reader, name="memory-digest", daemon=True)
    thread.start()
    timeout = max(MIN_TIMEOUT, SECONDS_PER_GIB * length / (1 << 30))
    try:
        qmp.execute("pmemsave", {"val": start, "size": length, "filename": str(fifo)}, timeout=timeout)
    except BaseException:
        # Unblock a reader still waiting for QEMU to open the FIFO.
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(5)
        raise
    thread.join(timeout)
    if failure:
        raise QemuError(f"reading guest memory failed: {failure[0]}")
    expected = -(-length // CHUNK_SIZE)
    if thread.is_alive() or len(digests) != expected:
        raise QemuError(f"guest memory read was short: {len(digests)} of {expected} MiB")
    return digests
