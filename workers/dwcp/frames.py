"""DWCP frames: the wire header, its parser and the typed control messages.

Every frame is a 32-byte header followed by ``wire_length`` payload bytes::

    type u8 | flags u8 | codec u8 | reserved u8 | seq_or_offset u64 |
    raw_length u32 | wire_length u32 | checksum u64 | header_check u32

``checksum`` is the xxh3-64 of the *raw* (decoded) bytes, so a receiver verifies what it will
write, whatever codec carried it. ``header_check`` is an xxh32 of the first 28 bytes: a damaged
length is caught before it is believed. Parsing never allocates more than the per-type limit in
``limits``. Control frames (OPEN, ACCEPT, ...) carry a small JSON object validated into a typed
message here, so the rest of the code never touches unchecked peer data.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass, field
from typing import Any, Final

import xxhash

from . import limits
from .errors import LocalProtocolError, RemoteProtocolError

HEADER = struct.Struct("!BBBBQIIQ")
HEADER_CHECK = struct.Struct("!I")
HEADER_SIZE: Final = HEADER.size + HEADER_CHECK.size  # 32
MAX_U64: Final = 2**64 - 1


class FrameType(enum.IntEnum):
    OPEN = 1  # initiator -> responder: start a transfer (ticket + parameters)
    ACCEPT = 2  # responder: transfer accepted (session key, what it already holds)
    ATTACH = 3  # initiator: join this connection to an opened transfer as an extra stream
    ATTACHED = 4  # responder: attach accepted
    DATA = 5  # either side: a chunk (file offset or tunnel sequence number)
    EOF = 6  # either side: tunnel half-close; seq is the number of DATA frames sent before it
    END = 7  # initiator: nothing more on this stream (primary: carries the file digest)
    RESULT = 8  # responder: answer to END; the connection is idle again afterwards
    ERROR = 9  # either side: fatal for the transfer; the connection is closed afterwards
    INDEX = 10  # responder: digests of the base image's chunks, for references
    CANCEL = 11  # initiator: abandon the transfer; answered by RESULT
    # Version 2 (resumable tunnels):
    ACK = 12  # either side of a tunnel: seq is the count of frames delivered so far (cumulative)
    RESUME = 13  # initiator: rejoin a cut tunnel (session key, next seq it needs); answered by ATTACHED


CONTROL_TYPES: Final = frozenset(
    {
        FrameType.OPEN,
        FrameType.ACCEPT,
        FrameType.ATTACH,
        FrameType.ATTACHED,
        FrameType.END,
        FrameType.RESULT,
        FrameType.ERROR,
        FrameType.CANCEL,
        FrameType.RESUME,
    }
)


class Codec(enum.IntEnum):
    RAW = 0
    LZ4 = 1  # lz4 block format, size carried in raw_length
    ZSTD = 2  # zstd frame with content size
    ZERO = 3  # raw_length zero bytes; no payload
    REF = 4  # payload is the u64 offset of an identical chunk in the receiver's base file


class Flags(enum.IntFlag):
    NONE = 0
    # On DATA: part of a resumed transfer (the receiver reported chunks it already held), so the
    # receiver's accounting can tell a first attempt's bytes from a retry's.
    RESUMED = 1


KNOWN_FLAGS: Final = int(Flags.RESUMED)


@dataclass(frozen=True, slots=True)
class Frame:
    type: FrameType
    flags: Flags = Flags.NONE
    codec: Codec = Codec.RAW
    seq_or_offset: int = 0
    raw_length: int = 0
    wire_length: int = 0
    checksum: int = 0
    payload: bytes | bytearray | memoryview = field(default=b"", repr=False, compare=False)

    def header(self) -> bytes:
        head = HEADER.pack(
            self.type,
            self.flags,
            self.codec,
            0,
            self.seq_or_offset,
            self.raw_length,
            self.wire_length,
            self.checksum,
        )
        return head + HEADER_CHECK.pack(xxhash.xxh32_intdigest(head))


def max_payload_for(frame_type: FrameType) -> int:
    if frame_type in CONTROL_TYPES:
        return limits.MAX_CONTROL_PAYLOAD
    if frame_type is FrameType.INDEX:
        return limits.MAX_INDEX_PAYLOAD
    if frame_type is FrameType.DATA:
        return limits.MAX_CHUNK_SIZE
    return 0  # EOF and ACK carry no payload


def parse_header(data: bytes | bytearray | memoryview) -> Frame:
    """Parse and validate a 32-byte header; the returned frame has an empty payload."""
    if len(data) != HEADER_SIZE:
        raise RemoteProtocolError(f"frame header must be {HEADER_SIZE} bytes, got {len(data)}")
    head = bytes(data[: HEADER.size])
    (check,) = HEADER_CHECK.unpack_from(data, HEADER.size)
    if xxhash.xxh32_intdigest(head) != check:
        raise RemoteProtocolError("frame header check failed (corrupted or not a DWCP frame)")
    type_value, flags, codec_value, reserved, seq, raw_length, wire_length, checksum = HEADER.unpack(head)
    try:
        frame_type = FrameType(type_value)
        codec = Codec(codec_value)
    except ValueError as exc:
        raise RemoteProtocolError(f"unknown frame type or codec: {exc}") from None
    if reserved != 0 or flags & ~KNOWN_FLAGS:
        raise RemoteProtocolError("reserved header bits set")
    limit = max_payload_for(frame_type)
    if wire_length > limit:
        raise RemoteProtocolError(f"{frame_type.name} payload of {wire_length} bytes exceeds {limit}")
    _check_lengths(frame_type, codec, raw_length, wire_length, RemoteProtocolError)
    return Frame(frame_type, Flags(flags), codec, seq, raw_length, wire_length, checksum)


def _check_lengths(
    frame_type: FrameType,
    codec: Codec,
    raw_length: int,
    wire_length: int,
    error: type[LocalProtocolError] | type[RemoteProtocolError],
) -> None:
    if frame_type is not FrameType.DATA:
        if codec is not Codec.RAW or raw_length != wire_length:
            raise error(f"{frame_type.name} frames are raw with raw_length == wire_length")
        return
    if not 0 < raw_length <= limits.MAX_CHUNK_SIZE:
        raise error(f"DATA raw_length {raw_length} outside 1..{limits.MAX_CHUNK_SIZE}")
    if codec is Codec.ZERO and wire_length != 0:
        raise error("ZERO frames carry no payload")
    if codec is Codec.REF and wire_length != 8:
        raise error("REF frames carry an 8-byte base offset")
    if codec is Codec.RAW and wire_length != raw_length:
        raise error("RAW frames have wire_length == raw_length")
    if codec in (Codec.LZ4, Codec.ZSTD) and not 0 < wire_length <= raw_length:
        raise error("compressed frames must be smaller than their raw size")


def make_frame(
    frame_type: FrameType,
    payload: bytes | bytearray | memoryview = b"",
    *,
    codec: Codec = Codec.RAW,
    flags: Flags = Flags.NONE,
    seq_or_offset: int = 0,
    raw_length: int | None = None,
    checksum: int | None = None,
) -> Frame:
    """Build a frame this side is about to send, refusing anything a peer would reject."""
    wire_length = len(payload)
    raw = wire_length if raw_length is None else raw_length
    if wire_length > max_payload_for(frame_type):
        raise LocalProtocolError(f"{frame_type.name} payload of {wire_length} bytes is too large")
    if not 0 <= seq_or_offset <= MAX_U64:
        raise LocalProtocolError("seq_or_offset out of range")
    _check_lengths(frame_type, codec, raw, wire_length, LocalProtocolError)
    if checksum is None:
        if frame_type is FrameType.DATA and codec is not Codec.RAW:
            raise LocalProtocolError("encoded DATA frames need the checksum of their raw bytes")
        checksum = xxhash.xxh3_64_intdigest(payload)
    return Frame(frame_type, flags, codec, seq_or_offset, raw, wire_length, checksum, payload)


# --- control messages ----------------------------------------------------------------------------


def control_frame(frame_type: FrameType, message: dict[str, Any]) -> Frame:
    if frame_type not in CONTROL_TYPES:
        raise LocalProtocolError(f"{frame_type.name} is not a control frame")
    payload = json.dumps(message, separators=(",", ":"), sort_keys=True).encode()
    return make_frame(frame_type, payload)


def parse_control(frame: Frame) -> ControlMessage:
    """Decode a control frame's payload into a checked dict wrapper."""
    if frame.type not in CONTROL_TYPES:
        raise RemoteProtocolError(f"{frame.type.name} is not a control frame")
    if xxhash.xxh3_64_intdigest(frame.payload) != frame.checksum:
        raise RemoteProtocolError(f"{frame.type.name} payload checksum mismatch")
    try:
        value = json.loads(bytes(frame.payload))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise RemoteProtocolError(f"{frame.type.name} payload is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise RemoteProtocolError(f"{frame.type.name} payload must be a JSON object")
    return ControlMessage(frame.type, value)


@dataclass(frozen=True, slots=True)
class ControlMessage:
    """A peer's JSON control payload with typed, validating accessors."""

    frame_type: FrameType
    fields: dict[str, Any]

    def _error(self, key: str, problem: str) -> RemoteProtocolError:
        return RemoteProtocolError(f"{self.frame_type.name}.{key} {problem}")

    def text(self, key: str, *, max_length: int = limits.MAX_TARGET_LENGTH) -> str:
        value = self.fields.get(key)
        if not isinstance(value, str) or not 0 < len(value) <= max_length:
            raise self._error(key, f"must be a string of 1..{max_length} characters")
        return value

    def optional_text(self, key: str, *, max_length: int = limits.MAX_TARGET_LENGTH) -> str | None:
        if self.fields.get(key) is None:
            return None
        return self.text(key, max_length=max_length)

    def integer(self, key: str, *, low: int, high: int) -> int:
        value = self.fields.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise self._error(key, f"must be an integer in {low}..{high}")
        return value

    def flag(self, key: str) -> bool:
        value = self.fields.get(key, False)
        if not isinstance(value, bool):
            raise self._error(key, "must be a boolean")
        return value

    def ranges(self, key: str, *, limit: int) -> list[tuple[int, int]]:
        """A list of [start, count] pairs, each within 0..limit, sorted and disjoint."""
        value = self.fields.get(key, [])
        if not isinstance(value, list):
            raise self._error(key, "must be a list")
        result: list[tuple[int, int]] = []
        previous_end = 0
        for item in value:
            if (
                not isinstance(item, list)
                or len(item) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in item)
            ):
                raise self._error(key, "entries must be [start, count]")
            start, count = item
            if start < previous_end or count <= 0 or start + count > limit:
                raise self._error(key, "ranges must be sorted, disjoint and in range")
            result.append((start, count))
            previous_end = start + count
        return result
