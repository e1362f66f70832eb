"""File-side machinery: target confinement, sparse iteration, digests, and the receiving file.

Files travel as fixed-size chunks on a grid (chunk ``i`` covers ``[i*chunk_size, (i+1)*chunk_size)``).
The grid makes resume and verification simple: the receiver keeps a bitmap of chunks it holds and
journals it next to the partial file; the whole-file digest is the xxh3-128 of the per-chunk
xxh3-64 values in order, which the sender computes from what it read and the receiver from what
it verified and wrote (or, after a resume, by reading the whole file back); holes count as zero
chunks on both sides. Data lands in
``.<name>.dwcp-part`` and is renamed to ``<name>`` only once that digest matches.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import struct
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

import xxhash

from . import codecs, limits
from .errors import ChecksumMismatch, RemoteProtocolError, TransferError
from .frames import Codec, Flags, Frame

logger = logging.getLogger(__name__)

PART_SUFFIX = ".dwcp-part"
JOURNAL_SUFFIX = ".dwcp-journal"
INDEX_SUFFIX = ".dwcp-index"
_CHECKSUM = struct.Struct("!Q")
INDEX_ENTRY = struct.Struct("!16sQ")  # BLAKE2b-128 of a base chunk, its offset


class TargetRefused(TransferError):
    code = "bad_target"


def resolve_target(root: Path, name: str) -> Path:
    """The path for ``name`` inside ``root``; refuses absolute paths, ``..`` and symlinks out."""
    if not name or "\0" in name or len(name) > limits.MAX_TARGET_LENGTH:
        raise TargetRefused(f"invalid target name {name!r}")
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise TargetRefused(f"target {name!r} must be a relative path without '..'")
    real_root = root.resolve(strict=True)
    candidate = real_root / relative
    resolved = candidate.resolve()
    if resolved == real_root or not resolved.is_relative_to(real_root):
        raise TargetRefused(f"target {name!r} resolves outside the server root")
    if candidate.is_symlink():
        raise TargetRefused(f"target {name!r} is a symlink")
    if resolved.name.startswith(".") and resolved.name.endswith((PART_SUFFIX, JOURNAL_SUFFIX, INDEX_SUFFIX)):
        raise TargetRefused(f"target {name!r} collides with DWCP's own working files")
    return resolved


def chunk_count(size: int, chunk_size: int) -> int:
    return (size + chunk_size - 1) // chunk_size


def chunk_length(index: int, size: int, chunk_size: int) -> int:
    return min(chunk_size, size - index * chunk_size)


def data_chunks(fd: int, size: int, chunk_size: int) -> Iterator[int]:
    """Indexes of chunks that overlap data (SEEK_DATA/SEEK_HOLE); chunks wholly in holes are skipped."""
    last = -1
    position = 0
    while position < size:
        try:
            start = os.lseek(fd, position, os.SEEK_DATA)
            end = min(size, os.lseek(fd, start, os.SEEK_HOLE))
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole remains
                return
            # The filesystem cannot report holes: treat everything left as data.
            start, end = position, size
        for index in range(max(last + 1, start // chunk_size), (end - 1) // chunk_size + 1):
            yield index
            last = index
        position = end


def file_digest(checksums: list[int]) -> str:
    """Whole-file digest from the per-chunk xxh3-64 values, in chunk order."""
    hasher = xxhash.xxh3_128()
    for value in checksums:
        hasher.update(_CHECKSUM.pack(value))
    return hasher.hexdigest()


def compute_checksums(fd: int, size: int, chunk_size: int, executor: Executor) -> list[int]:
    """Per-chunk xxh3-64 of a file as it is on disk (holes hashed as zeros without reading)."""
    count = chunk_count(size, chunk_size)
    checksums = [codecs.zero_checksum(chunk_length(i, size, chunk_size)) for i in range(count)]

    def hash_chunk(index: int) -> tuple[int, int]:
        data = os.pread(fd, chunk_length(index, size, chunk_size), index * chunk_size)
        return index, xxhash.xxh3_64_intdigest(data)

    # map() keeps at most a bounded number of reads in flight per worker in practice.
    for index, value in executor.map(hash_chunk, data_chunks(fd, size, chunk_size)):
        checksums[index] = value
    return checksums


class ChunkMap:
    """A bitmap of held chunks with conversion to and from [start, count] ranges."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._bits = bytearray((count + 7) // 8)
        self.held = 0

    def add(self, index: int) -> None:
        byte, bit = divmod(index, 8)
        if not self._bits[byte] & (1 << bit):
            self._bits[byte] |= 1 << bit
            self.held += 1

    def __contains__(self, index: int) -> bool:
        byte, bit = divmod(index, 8)
        return bool(self._bits[byte] & (1 << bit))

    def ranges(self) -> list[list[int]]:
        result: list[list[int]] = []
        for index in range(self.count):
            if index in self:
                if result and result[-1][0] + result[-1][1] == index:
                    result[-1][1] += 1
                else:
                    result.append([index, 1])
        return result

    @classmethod
    def from_ranges(cls, count: int, ranges: list[tuple[int, int]]) -> ChunkMap:
        chunk_map = cls(count)
        for start, length in ranges:
            for index in range(start, start + length):
                chunk_map.add(index)
        return chunk_map


@dataclass(frozen=True, slots=True)
class IncomingFile:
    target: Path
    size: int
    chunk_size: int
    source_id: str
    base: Path | None
    resume: bool = True  # pick up a partial file left by an earlier attempt of the same source


class FileReceiver:
    """Writes one incoming file under its temporary name, verifies it, then renames it."""

    def __init__(self, spec: IncomingFile) -> None:
        self.spec = spec
        self.count = chunk_count(spec.size, spec.chunk_size)
        self.part_path = spec.target.with_name(f".{spec.target.name}{PART_SUFFIX}")
        self.journal_path = spec.target.with_name(f".{spec.target.name}{JOURNAL_SUFFIX}")
        spec.target.parent.mkdir(parents=True, exist_ok=True)
        self.held = self._load_journal() if spec.resume else ChunkMap(self.count)
        self.resumed = self.held.held > 0
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | (0 if self.resumed else os.O_TRUNC)
        self.fd = os.open(self.part_path, flags, 0o600)
        os.ftruncate(self.fd, spec.size)
        self.base_fd = os.open(spec.base, os.O_RDONLY | os.O_CLOEXEC) if spec.base is not None else None
        self._lock = threading.Lock()
        self._journal_written = 0.0
        self.bytes_written = 0
        self.bytes_referenced = 0
        self.bytes_resumed = 0  # arrived in frames flagged RESUMED (a later attempt of a cut transfer)
        # xxh3-64 of every chunk written in this session, checked against the frame before pwrite.
        self.checksums: list[int | None] = [None] * self.count

    def _load_journal(self) -> ChunkMap:
        empty = ChunkMap(self.count)
        try:
            document = json.loads(self.journal_path.read_text())
        except (OSError, ValueError):
            return empty
        same_source = (
            isinstance(document, dict)
            and document.get("source_id") == self.spec.source_id
            and document.get("size") == self.spec.size
            and document.get("chunk_size") == self.spec.chunk_size
            and self.part_path.is_file()
            and not self.part_path.is_symlink()
        )
        if not same_source:
            return empty
        try:
            ranges = [(int(start), int(length)) for start, length in document["held"]]
            if any(start < 0 or length <= 0 or start + length > self.count for start, length in ranges):
                return empty
        except (KeyError, TypeError, ValueError):
            return empty
        return ChunkMap.from_ranges(self.count, ranges)

    def held_ranges(self) -> list[list[int]]:
        return self.held.ranges()

    def base_index(self, executor: Executor) -> bytes:
        """INDEX payload: BLAKE2b-128 and offset of each non-zero chunk of the base file.

        Hashing a multi-GiB base takes seconds, so the result is kept next to the base in
        ``.<base>.<chunk size>.dwcp-index`` and reused while the base's size and mtime match.
        """
        if self.base_fd is None or self.spec.base is None:
            return b""
        base_fd = self.base_fd
        stat = os.fstat(base_fd)
        chunk_size = self.spec.chunk_size
        cache = self.spec.base.with_name(f".{self.spec.base.name}.{chunk_size}{INDEX_SUFFIX}")
        stamp = f"{stat.st_size} {stat.st_mtime_ns} {stat.st_ino}\n".encode()
        with contextlib.suppress(OSError):
            cached = cache.read_bytes()
            if cached.startswith(stamp):
                return cached[len(stamp) :]
        max_entries = limits.MAX_INDEX_PAYLOAD // INDEX_ENTRY.size

        def entry(index: int) -> bytes:
            data = os.pread(base_fd, chunk_size, index * chunk_size)
            if len(data) != chunk_size or codecs.is_zero(data):
                return b""  # tails and zero chunks are handled without references
            return INDEX_ENTRY.pack(codecs.dedup_key(data), index * chunk_size)

        entries = [e for e in executor.map(entry, data_chunks(base_fd, stat.st_size, chunk_size)) if e]
        payload = b"".join(entries[:max_entries])
        scratch = cache.with_name(cache.name + ".tmp")
        with contextlib.suppress(OSError):  # only a cache: a read-only image directory is fine
            scratch.write_bytes(stamp + payload)
            os.replace(scratch, cache)
        return payload

    def write(self, frame: Frame) -> int:
        """Verify and store one DATA frame; returns the raw bytes it covered."""
        offset = frame.seq_or_offset
        written = referenced = 0
        index, misalignment = divmod(offset, self.spec.chunk_size)
        if misalignment or index >= self.count:
            raise RemoteProtocolError(f"chunk offset {offset} is not on this file's chunk grid")
        if frame.raw_length != chunk_length(index, self.spec.size, self.spec.chunk_size):
            raise RemoteProtocolError(f"chunk {index} has the wrong length {frame.raw_length}")
        if frame.codec is Codec.REF:
            if self.base_fd is None:
                raise RemoteProtocolError("reference received but no base file was named")
            base_offset = codecs.reference_offset(frame)
            data: bytes | bytearray | memoryview = os.pread(self.base_fd, frame.raw_length, base_offset)
            codecs.verify(frame, data)
            os.pwrite(self.fd, data, offset)
            referenced = frame.raw_length
        elif frame.codec is Codec.ZERO:
            zeros = codecs.decode(frame)
            if self.resumed:  # a fresh part file is already zero (sparse) there
                os.pwrite(self.fd, zeros, offset)
        else:
            data = codecs.decode(frame)
            os.pwrite(self.fd, data, offset)
            written = frame.raw_length
        # Start writing this chunk back now (asynchronously), so the fsync before the rename finds
        # little left to do and the page cache does not fill up with a multi-GiB image.
        os.posix_fadvise(self.fd, offset, frame.raw_length, os.POSIX_FADV_DONTNEED)
        with self._lock:
            self.held.add(index)
            self.checksums[index] = frame.checksum
            self.bytes_written += written
            self.bytes_referenced += referenced
            if frame.flags & Flags.RESUMED:
                self.bytes_resumed += frame.raw_length
            now = time.monotonic()
            if now - self._journal_written >= limits.JOURNAL_INTERVAL_SECONDS:
                self._write_journal()
                self._journal_written = now
        return frame.raw_length

    def _write_journal(self) -> None:
        # No fdatasync here: it would stall every stream once a second. If a crash loses page
        # cache the journal claimed, the read-back after a resume fails the digest, the partial
        # is discarded and the next attempt starts over: a rare restart, never bad data.
        document = {
            "source_id": self.spec.source_id,
            "size": self.spec.size,
            "chunk_size": self.spec.chunk_size,
            "held": self.held.ranges(),
        }
        scratch = self.journal_path.with_name(self.journal_path.name + ".tmp")
        scratch.write_text(json.dumps(document))
        os.replace(scratch, self.journal_path)

    def finish(self, expected_digest: str, executor: Executor) -> str:
        """Compare the whole-file digest with the sender's, then rename into place.

        A fresh part file holds exactly the chunks verified on arrival (the rest was created as
        holes), so its digest follows from their checksums. A resumed one may hold bytes from an
        earlier attempt that nothing checked since, so it is read back in full instead.
        """
        os.fsync(self.fd)  # durable before it gets its final name: the source may be deleted next
        if self.resumed:
            checksums = compute_checksums(self.fd, self.spec.size, self.spec.chunk_size, executor)
        else:
            checksums = [
                codecs.zero_checksum(chunk_length(index, self.spec.size, self.spec.chunk_size))
                if value is None
                else value
                for index, value in enumerate(self.checksums)
            ]
        digest = file_digest(checksums)
        if digest != expected_digest:
            self.discard()
            raise ChecksumMismatch(f"whole-file digest mismatch for {self.spec.target.name}: got {digest}")
        os.replace(self.part_path, self.spec.target)
        with contextlib.suppress(FileNotFoundError):
            self.journal_path.unlink()
        directory = os.open(self.spec.target.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        self.close()
        return digest

    def suspend(self) -> None:
        """Keep the partial file and journal for a later resume; unless the part file was removed
        meanwhile (an aborted migration cleaned up while the session waited for a resume): a journal
        without its part file would only be litter."""
        with self._lock, contextlib.suppress(OSError):
            if self.fd >= 0 and os.fstat(self.fd).st_nlink > 0:
                self._write_journal()
        self.close()

    def discard(self) -> None:
        for path in (self.part_path, self.journal_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self.close()

    def close(self) -> None:
        for fd in (self.fd, self.base_fd):
            if fd is not None and fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.fd = -1
        self.base_fd = None
