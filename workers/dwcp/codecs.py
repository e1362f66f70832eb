"""Per-chunk codecs and the adaptive policy that picks one.

Every chunk is, in order of preference: a reference to an identical chunk of the receiver's base
image (no payload), elided because it is all zeros (no payload), sent raw because a cheap sample
says it will not compress (the incompressible fast path), or compressed with lz4 or zstd at the
level the ``AdaptivePolicy`` currently asks for. lz4 and zstd release the GIL, so encoding runs in
a thread pool and uses every core. Decoding is bounded: the output size is the frame's
``raw_length`` (at most ``MAX_CHUNK_SIZE``) and the result must match the frame's xxh3-64.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import logging
import os
import struct
import threading
import time
from dataclasses import dataclass
from typing import Final

import lz4.block
import xxhash
import zstandard

from . import limits
from .errors import ChecksumMismatch, RemoteProtocolError
from .frames import Codec, Frame

logger = logging.getLogger(__name__)

_ZEROS: Final = bytes(limits.MAX_CHUNK_SIZE)
_ZEROS_VIEW: Final = memoryview(_ZEROS)
_OFFSET: Final = struct.Struct("!Q")


class CodecMode(enum.Enum):
    AUTO = "auto"
    LZ4 = "lz4"
    ZSTD = "zstd"
    RAW = "raw"


@dataclass(frozen=True, slots=True)
class Level:
    """One rung of the compression ladder."""

    codec: Codec
    zstd_level: int = 0

    @property
    def label(self) -> str:
        return self.codec.name.lower() + (f"-{self.zstd_level}" if self.codec is Codec.ZSTD else "")


# Cheapest to strongest. The adaptive policy moves along this ladder one rung at a time.
LADDER: Final = (
    Level(Codec.RAW),
    Level(Codec.LZ4),
    Level(Codec.ZSTD, 1),
    Level(Codec.ZSTD, 3),
    Level(Codec.ZSTD, 9),
)
LZ4_RUNG: Final = 1


@dataclass(frozen=True, slots=True)
class EncodedChunk:
    codec: Codec
    payload: bytes | memoryview
    raw_length: int
    checksum: int  # xxh3-64 of the raw bytes


def is_zero(data: bytes | bytearray | memoryview) -> bool:
    # One memcmp against the constant, copying nothing (``==`` on a slice of it would copy the
    # slice first, and ``==`` on memoryviews compares byte by byte: 100 times slower).
    return _ZEROS.startswith(data)


def dedup_key(data: bytes | bytearray | memoryview) -> bytes:
    """Content identity for base-image references: 128-bit BLAKE2b, collision-resistant."""
    return hashlib.blake2b(data, digest_size=16).digest()


@functools.lru_cache(maxsize=64)  # lengths are the chunk size and a few tails
def zero_checksum(length: int) -> int:
    return xxhash.xxh3_64_intdigest(_ZEROS_VIEW[:length])


_local = threading.local()


def _zstd_compressor(level: int) -> zstandard.ZstdCompressor:
    compressors: dict[int, zstandard.ZstdCompressor] = _local.__dict__.setdefault("compressors", {})
    if level not in compressors:
        compressors[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return compressors[level]


def _zstd_decompressor() -> zstandard.ZstdDecompressor:
    decompressor: zstandard.ZstdDecompressor | None = getattr(_local, "decompressor", None)
    if decompressor is None:
        decompressor = _local.decompressor = zstandard.ZstdDecompressor()
    return decompressor


def looks_incompressible(data: bytes | bytearray | memoryview) -> bool:
    """Compress three small slices with lz4; if they barely shrink, the chunk won't either."""
    length = len(data)
    slice_size = limits.COMPRESSIBILITY_SAMPLE_SIZE // 3
    if length <= limits.COMPRESSIBILITY_SAMPLE_SIZE:
        sample = bytes(data)
    else:
        middle = length // 2
        sample = b"".join(
            (data[:slice_size], data[middle : middle + slice_size], data[length - slice_size :])
        )
    compressed = lz4.block.compress(sample, store_size=False)
    return len(compressed) > len(sample) * limits.INCOMPRESSIBLE_SAMPLE_RATIO


def encode(data: bytes | bytearray | memoryview, level: Level) -> EncodedChunk:
    """Encode one chunk at ``level`` (zero elision and the raw fast path apply at every level)."""
    length = len(data)
    if is_zero(data):  # its checksum is known: no pass over the bytes to hash them
        return EncodedChunk(Codec.ZERO, b"", length, zero_checksum(length))
    checksum = xxhash.xxh3_64_intdigest(data)
    if level.codec is Codec.RAW or looks_incompressible(data):
        return EncodedChunk(Codec.RAW, _as_payload(data), length, checksum)
    if level.codec is Codec.LZ4:
        compressed = lz4.block.compress(data, store_size=False)
    else:
        compressed = _zstd_compressor(level.zstd_level).compress(data)
    if len(compressed) > length * (1 - limits.MIN_COMPRESSION_GAIN):
        return EncodedChunk(Codec.RAW, _as_payload(data), length, checksum)
    return EncodedChunk(level.codec, compressed, length, checksum)


def _as_payload(data: bytes | bytearray | memoryview) -> bytes | memoryview:
    return data if isinstance(data, bytes | memoryview) else bytes(data)


def reference(base_offset: int, data: bytes | bytearray | memoryview) -> EncodedChunk:
    return EncodedChunk(Codec.REF, _OFFSET.pack(base_offset), len(data), xxhash.xxh3_64_intdigest(data))


def reference_offset(frame: Frame) -> int:
    (offset,) = _OFFSET.unpack(frame.payload)
    return int(offset)


def decode(frame: Frame) -> bytes | bytearray | memoryview:
    """Decode a DATA frame's payload (not REF) and verify it against the frame's checksum."""
    try:
        if frame.codec is Codec.RAW:
            data: bytes | bytearray | memoryview = frame.payload
        elif frame.codec is Codec.ZERO:
            if frame.raw_length > limits.MAX_CHUNK_SIZE or frame.checksum != zero_checksum(frame.raw_length):
                raise ChecksumMismatch(f"chunk at {frame.seq_or_offset} fails its xxh3-64 checksum")
            return _ZEROS_VIEW[: frame.raw_length]  # verified by its checksum, which zeros always have
        elif frame.codec is Codec.LZ4:
            data = lz4.block.decompress(frame.payload, uncompressed_size=frame.raw_length)
        elif frame.codec is Codec.ZSTD:
            data = _zstd_decompressor().decompress(frame.payload, max_output_size=frame.raw_length)
        else:
            raise RemoteProtocolError(f"{frame.codec.name} frames are not decoded here")
    except (lz4.block.LZ4BlockError, zstandard.ZstdError) as exc:
        raise ChecksumMismatch(f"chunk at {frame.seq_or_offset} does not decode: {exc}") from None
    verify(frame, data)
    return data


def verify(frame: Frame, data: bytes | bytearray | memoryview) -> None:
    if len(data) != frame.raw_length or xxhash.xxh3_64_intdigest(data) != frame.checksum:
        raise ChecksumMismatch(f"chunk at {frame.seq_or_offset} fails its xxh3-64 checksum")


class AdaptivePolicy:
    """Chooses the compression level from where the sending pipeline stalls.

    After each frame a stream writer reports how long it waited for an encoded chunk and whether
    its socket still had more than ``LINK_BACKLOG_BYTES`` unsent. A backlog means the link (or
    the receiver behind it) is the bottleneck: spend CPU to send fewer bytes, one rung stronger.
    No backlog while writers wait for the codec pool means the CPU is the bottleneck: one rung
    lighter, unless the codec workers spent that time reading a slow source (then no codec
    helps). Waiting time alone would mislead, because 8 MiB socket buffers swallow whole short
    transfers without ever blocking ``send``. Decisions are taken every ``ADAPT_INTERVAL_SECONDS``;
    in the first window (the pipeline filling up, every writer waiting for its first chunk) only a
    backlog counts. Fixed modes never move. ``start`` is the codec an automatic policy begins with
    (its lightest level; lz4 when the peer does not offer it).
    """

    def __init__(
        self,
        mode: CodecMode = CodecMode.AUTO,
        *,
        writers: int = 1,
        allow_lz4: bool = True,
        allow_zstd: bool = True,
        start: Codec = Codec.LZ4,
    ) -> None:
        self.mode = mode
        self._writers = max(1, writers)
        allowed = (
            {Codec.RAW} | ({Codec.LZ4} if allow_lz4 else set()) | ({Codec.ZSTD} if allow_zstd else set())
        )
        self._ladder = [level for level in LADDER if level.codec in allowed]
        if mode is CodecMode.AUTO:
            first_choice = (start, Codec.LZ4)  # the first allowed of these, else raw
            self._rung = next(
                (i for codec in first_choice for i, level in enumerate(self._ladder) if level.codec is codec),
                0,
            )
        else:
            wanted = {CodecMode.LZ4: Codec.LZ4, CodecMode.ZSTD: Codec.ZSTD, CodecMode.RAW: Codec.RAW}[mode]
            if wanted not in allowed:
                raise ValueError(f"codec {mode.value} is not supported by the peer")
            self._rung = next(i for i, level in enumerate(self._ladder) if level.codec is wanted)
        self._lock = threading.Lock()
        self._frames = 0
        self._backlogged = 0
        self._starved = 0.0
        self._reading = 0.0
        self._workers = os.cpu_count() or 2  # the codec pool's size
        self._window_start = time.monotonic()
        self._warmed_up = False

    @property
    def level(self) -> Level:
        return self._ladder[self._rung]

    def record_source(self, seconds: float) -> None:
        """Time a codec worker spent reading its chunk: a slow disk starves writers, not the CPU."""
        if self.mode is CodecMode.AUTO:
            with self._lock:
                self._reading += seconds

    def record(self, *, starved_seconds: float, backlogged: bool) -> None:
        if self.mode is not CodecMode.AUTO:
            return
        with self._lock:
            self._frames += 1
            self._backlogged += backlogged
            self._starved += starved_seconds
            now = time.monotonic()
            window = now - self._window_start
            if window < limits.ADAPT_INTERVAL_SECONDS:
                return
            backlog_share = self._backlogged / self._frames
            # Summed over all writers, so it can exceed the window: compare per writer-second.
            starved_share = self._starved / (window * self._writers)
            previous = self._rung
            if backlog_share > 0.5 and self._rung < len(self._ladder) - 1:
                self._rung += 1  # link-bound: stronger
            elif (
                self._warmed_up
                and backlog_share < 0.1
                and starved_share > 0.5
                and self._reading < 0.5 * window * self._workers
                and self._rung > 0
            ):
                self._rung -= 1  # CPU-bound (codec workers busy, not reading): lighter
            if self._rung != previous:
                logger.debug(
                    "codec %s -> %s: %d frames, %.0f%% backlogged, writers %.0f%% starved",
                    self._ladder[previous].label,
                    self.level.label,
                    self._frames,
                    backlog_share * 100,
                    starved_share * 100,
                )
            self._frames = self._backlogged = 0
            self._starved = self._reading = 0.0
            self._window_start = now
            self._warmed_up = True
