"""A digest of a paused guest's RAM, to prove a live migration delivered it whole.

QEMU 7.2 under TCG can lose a guest write during a live migration: a page written after its last
transfer is never marked dirty again, so the destination resumes with the older copy (seen here
in migrations through a DWCP tunnel whose stream arrived byte for byte, some ending in a guest
kernel oops). Comparing both sides' RAM while both are paused,
before the destination resumes, catches it.

Two ways to read the RAM, hashed with xxh3 in ``CHUNK_SIZE`` pieces so a mismatch can say how
much differs; both sides of a check must use the same one (the digest names its method):

* ``process``: straight from QEMU's own mapping of the guest RAM through ``/proc/PID/mem`` (needs
  ptrace-level access to QEMU: the same user without Yama restrictions, or root); the faster way.
  The mapping is the one anonymous read-write mapping of exactly the RAM's size; the RAM block
  holds the low and the high part one after the other, as the ranges below list them.
* ``pmemsave``: QMP ``pmemsave`` into a FIFO that a thread hashes as it arrives (nothing is written
  to disk), over the ranges where the q35 machine maps RAM: all of it below 4 GiB up to 2816 MiB,
  else 2 GiB below and the rest from 4 GiB. Slower; works wherever QMP does.
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


PROCESS = "process"
PMEMSAVE = "pmemsave"
METHODS = (PROCESS, PMEMSAVE)


@dataclass(frozen=True)
class MemoryDigest:
    """xxh3-64 of each ``CHUNK_SIZE`` piece of guest RAM, range after range, and how it was read."""

    chunks: tuple[int, ...]
    method: str = PMEMSAVE

    def differing(self, other: MemoryDigest) -> int:
        """How many chunks differ (a length mismatch counts the extra chunks)."""
        pairs = zip(self.chunks, other.chunks, strict=False)
        return sum(1 for mine, theirs in pairs if mine != theirs) + abs(len(self.chunks) - len(other.chunks))

    def to_json(self) -> dict[str, object]:
        return {"method": self.method, "chunks": [f"{value:016x}" for value in self.chunks]}

    @classmethod
    def from_json(cls, value: object) -> MemoryDigest:
        if not isinstance(value, dict) or value.get("method") not in METHODS:
            raise ValueError(f"a memory digest names its method, one of {', '.join(METHODS)}")
        chunks = value.get("chunks")
        if not isinstance(chunks, list) or not all(
            isinstance(item, str) and len(item) == 16 for item in chunks
        ):
            raise ValueError("a memory digest's chunks are a list of 16-digit hex strings")
        return cls(tuple(int(item, 16) for item in chunks), str(value["method"]))


def memory_digest(
    qmp: QmpSession,
    memory_mb: int,
    *,
    pid: int | None = None,
    method: str | None = None,
    scratch: Path | None = None,
) -> MemoryDigest:
    """Digest of the RAM of the (paused) guest behind ``qmp`` (QEMU process ``pid``).

    ``method`` None takes ``process`` where the mapping can be read and ``pmemsave`` otherwise; a
    named method is used or fails (QemuError). ``scratch`` holds pmemsave's FIFO.
    """
    if method not in (None, *METHODS):
        raise ValueError(f"unknown memory digest method {method!r}")
    if method in (None, PROCESS):
        try:
            if pid is None:
                raise QemuError("no QEMU process id to read the guest RAM from")
            return MemoryDigest(_read_process(pid, memory_mb), PROCESS)
        except QemuError:
            if method == PROCESS:
                raise
    try:
        chunks: list[int] = []
        with tempfile.TemporaryDirectory(prefix="memdigest-", dir=scratch) as tmp:
            fifo = Path(tmp) / "ram.fifo"
            os.mkfifo(fifo, 0o600)
            for start, length in q35_ram_ranges(memory_mb):
                chunks += _read_range(qmp, fifo, start, length)
    except OSError as exc:
        raise QemuError(f"reading guest memory failed: {exc}") from exc
    return MemoryDigest(tuple(chunks), PMEMSAVE)


def ram_mapping(pid: int, memory_mb: int) -> int:
    """Where QEMU ``pid`` maps the guest's RAM: its one anonymous read-write mapping of that size."""
    size = memory_mb << 20
    starts = []
    try:
        lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    except OSError as exc:
        raise QemuError(f"cannot read the mappings of QEMU {pid}: {exc}") from exc
    for line in lines:
        fields = line.split()
        low, high = (int(value, 16) for value in fields[0].split("-"))
        if high - low == size and fields[1] == "rw-p" and len(fields) == 5:
            starts.append(low)
    if len(starts) != 1:
        raise QemuError(f"QEMU {pid} has {len(starts)} anonymous mappings of {memory_mb} MiB, not one")
    return starts[0]


def _read_process(pid: int, memory_mb: int) -> tuple[int, ...]:
    start = ram_mapping(pid, memory_mb)
    size = memory_mb << 20
    buffer = bytearray(CHUNK_SIZE)
    view = memoryview(buffer)
    chunks = []
    try:
        with open(f"/proc/{pid}/mem", "rb", buffering=0) as memory:
            for offset in range(0, size, CHUNK_SIZE):
                want = min(CHUNK_SIZE, size - offset)
                got = os.preadv(memory.fileno(), [view[:want]], start + offset)
                if got != want:
                    raise QemuError(f"guest RAM of QEMU {pid} read short at {offset}: {got} of {want} bytes")
                chunks.append(xxhash.xxh3_64_intdigest(view[:want]))
    except OSError as exc:
        raise QemuError(f"cannot read the guest RAM of QEMU {pid}: {exc}") from exc
    return tuple(chunks)


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
