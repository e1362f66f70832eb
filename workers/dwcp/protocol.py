"""The sans-I/O DWCP connection: handshake, frame parsing and the state machine.

Nothing here touches a socket. Feed received bytes to ``Connection.receive_data`` and take
``next_event()``; ask ``send(frame)`` for the buffers to write. Adapters (``transport``) own the
sockets. The design follows h11: states are an enum, legal moves are a table, a move not in the
table is a ``LocalProtocolError`` when we attempt it and a ``RemoteProtocolError`` when the peer does.

Handshake (1.5 round trips, mutual proof of the shared secret, bound to both nonces)::

    initiator -> HELLO(magic, version, capabilities, nonce_i)
    responder -> HELLO(magic, version, capabilities, nonce_r) + PROOF_r
    initiator -> PROOF_i            (and may pipeline OPEN right behind it)

``PROOF_x = HMAC-SHA256(secret, label_x || hello_i || hello_r)``, with distinct labels so a proof
cannot be reflected back. Version and capabilities are the minimum / intersection of both hellos.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import struct
from dataclasses import dataclass
from typing import Final

from . import limits
from .errors import ConnectionLost, LocalProtocolError, RemoteProtocolError, TLSMismatch
from .frames import HEADER_SIZE, Frame, FrameType, parse_header

MAGIC: Final = b"DWCP"
HELLO = struct.Struct("!4sHI16s")  # magic, version, capabilities, nonce
PROOF_SIZE: Final = 32
TLS_HANDSHAKE_RECORD: Final = 0x16  # a ClientHello's first byte, then 0x03 (a peer configured for TLS)
NONCE_SIZE: Final = 16
INITIATOR_LABEL: Final = b"dwcp/1 initiator proof"
RESPONDER_LABEL: Final = b"dwcp/1 responder proof"


class Capability(enum.IntFlag):
    LZ4 = 1
    ZSTD = 2
    REFERENCES = 4  # base-image chunk references (Codec.REF, INDEX frames)
    TUNNEL = 8
    RESUME = 16


ALL_CAPABILITIES: Final = (
    Capability.LZ4 | Capability.ZSTD | Capability.REFERENCES | Capability.TUNNEL | Capability.RESUME
)


class Role(enum.Enum):
    INITIATOR = "initiator"  # the side that connected (the sender of files, the tunnel opener)
    RESPONDER = "responder"  # the DWCP server


class State(enum.Enum):
    SEND_HELLO = "send-hello"  # initiator, nothing sent yet
    AWAIT_HELLO = "await-hello"  # waiting for the peer's hello
    AWAIT_PROOF = "await-proof"  # responder, waiting for the initiator's proof
    READY = "ready"  # authenticated and idle: a transfer may start
    OPENING = "opening"  # OPEN sent, waiting for ACCEPT or ERROR
    ATTACHING = "attaching"  # ATTACH sent, waiting for ATTACHED or ERROR
    STREAMING = "streaming"  # a transfer runs on this connection
    DRAINING = "draining"  # initiator sent END/CANCEL; responder may still send until RESULT
    CLOSED = "closed"  # an ERROR went either way, or the byte stream ended


INI, RES = Role.INITIATOR, Role.RESPONDER
S = State
# (state, role of the frame's sender, frame type) -> next state.
TRANSITIONS: Final[dict[tuple[State, Role, FrameType], State]] = {
    (S.READY, INI, FrameType.OPEN): S.OPENING,
    (S.READY, INI, FrameType.ATTACH): S.ATTACHING,
    (S.READY, INI, FrameType.RESUME): S.ATTACHING,
    (S.OPENING, RES, FrameType.ACCEPT): S.STREAMING,
    (S.OPENING, RES, FrameType.ERROR): S.READY,  # refusal: the connection stays usable
    (S.ATTACHING, RES, FrameType.ATTACHED): S.STREAMING,
    (S.ATTACHING, RES, FrameType.ERROR): S.READY,
    (S.STREAMING, INI, FrameType.DATA): S.STREAMING,
    (S.STREAMING, RES, FrameType.DATA): S.STREAMING,  # tunnels carry data both ways
    (S.STREAMING, INI, FrameType.EOF): S.STREAMING,
    (S.STREAMING, RES, FrameType.EOF): S.STREAMING,
    (S.STREAMING, RES, FrameType.INDEX): S.STREAMING,
    (S.STREAMING, INI, FrameType.ACK): S.STREAMING,
    (S.STREAMING, RES, FrameType.ACK): S.STREAMING,
    (S.STREAMING, INI, FrameType.END): S.DRAINING,
    (S.STREAMING, INI, FrameType.CANCEL): S.DRAINING,
    (S.STREAMING, INI, FrameType.ERROR): S.CLOSED,
    (S.STREAMING, RES, FrameType.ERROR): S.CLOSED,
    (S.DRAINING, RES, FrameType.DATA): S.DRAINING,
    (S.DRAINING, RES, FrameType.EOF): S.DRAINING,
    (S.DRAINING, RES, FrameType.ACK): S.DRAINING,  # sent before the responder saw END
    (S.DRAINING, RES, FrameType.RESULT): S.READY,
    (S.DRAINING, RES, FrameType.ERROR): S.CLOSED,
}
del INI, RES, S


@dataclass(frozen=True, slots=True)
class Hello:
    version: int
    capabilities: Capability
    nonce: bytes

    def encode(self) -> bytes:
        return HELLO.pack(MAGIC, self.version, self.capabilities, self.nonce)

    @classmethod
    def parse(cls, data: bytes) -> Hello:
        if len(data) != HELLO.size:
            raise RemoteProtocolError(f"hello must be {HELLO.size} bytes")
        magic, version, capabilities, nonce = HELLO.unpack(data)
        if magic != MAGIC:
            if data[0] == TLS_HANDSHAKE_RECORD and data[1] == 3:
                raise TLSMismatch(
                    "peer is speaking TLS, not plain DWCP: it has DWCP_TLS_* set and this side does not"
                )
            raise RemoteProtocolError("peer is not speaking DWCP (bad magic)")
        if version < limits.MIN_PROTOCOL_VERSION:
            raise RemoteProtocolError(
                f"peer speaks DWCP version {version}, we need >= {limits.MIN_PROTOCOL_VERSION}"
            )
        return cls(version, Capability(capabilities & ALL_CAPABILITIES), nonce)


@dataclass(frozen=True, slots=True)
class HandshakeComplete:
    version: int
    capabilities: Capability


@dataclass(frozen=True, slots=True)
class NeedData:
    """Not enough bytes yet; ``count`` more are needed for the next step."""

    count: int


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer ended the byte stream at a frame boundary."""


Event = HandshakeComplete | Frame | NeedData | ConnectionClosed


class Connection:
    """One side of one DWCP connection, as a pure state machine over bytes."""

    def __init__(
        self,
        role: Role,
        secret: bytes,
        *,
        capabilities: Capability = ALL_CAPABILITIES,
        nonce: bytes | None = None,
    ) -> None:
        if not secret:
            raise LocalProtocolError("an empty shared secret authenticates nobody")
        self.role = role
        self.peer_role = Role.RESPONDER if role is Role.INITIATOR else Role.INITIATOR
        self.state = State.SEND_HELLO if role is Role.INITIATOR else State.AWAIT_HELLO
        self.version = limits.PROTOCOL_VERSION
        self.capabilities = capabilities
        self._secret = secret
        self._hello = Hello(limits.PROTOCOL_VERSION, capabilities, nonce or os.urandom(NONCE_SIZE))
        self._initiator_hello = b""
        self._responder_hello = b""
        self._buffer = bytearray()
        self._pending_header: Frame | None = None
        self._payload: bytes | bytearray | None = None  # a whole payload handed over uncopied
        self._eof = False
        self._outgoing: list[bytes] = []

    # -- handshake -------------------------------------------------------------------------------

    def initiate(self) -> bytes:
        """Initiator only: the hello to send first."""
        if self.role is not Role.INITIATOR or self.state is not State.SEND_HELLO:
            raise LocalProtocolError("only a fresh initiator sends the first hello")
        self._initiator_hello = self._hello.encode()
        self.state = State.AWAIT_HELLO
        return self._initiator_hello

    def data_to_send(self) -> bytes:
        """Handshake bytes produced while receiving (the responder's hello, the initiator's proof)."""
        data = b"".join(self._outgoing)
        self._outgoing.clear()
        return data

    def _proof(self, label: bytes) -> bytes:
        return hmac.new(
            self._secret, label + self._initiator_hello + self._responder_hello, hashlib.sha256
        ).digest()

    def _negotiate(self, peer: Hello) -> None:
        self.version = min(self.version, peer.version)
        self.capabilities = self.capabilities & peer.capabilities

    def _handshake_step(self) -> Event | None:
        if self.state is State.AWAIT_HELLO and self.role is Role.RESPONDER:
            if len(self._buffer) < HELLO.size:
                return None
            self._initiator_hello = bytes(self._buffer[: HELLO.size])
            del self._buffer[: HELLO.size]
            peer = Hello.parse(self._initiator_hello)
            self._negotiate(peer)
            self._responder_hello = Hello(self.version, self.capabilities, self._hello.nonce).encode()
            self._outgoing.append(self._responder_hello + self._proof(RESPONDER_LABEL))
            self.state = State.AWAIT_PROOF
            return None
        if self.state is State.AWAIT_PROOF:
            if len(self._buffer) < PROOF_SIZE:
                return None
            proof = bytes(self._buffer[:PROOF_SIZE])
            del self._buffer[:PROOF_SIZE]
            if not hmac.compare_digest(proof, self._proof(INITIATOR_LABEL)):
                raise RemoteProtocolError("initiator failed to prove the shared secret")
            self.state = State.READY
            return HandshakeComplete(self.version, self.capabilities)
        # initiator awaiting the responder's hello and proof
        if len(self._buffer) < HELLO.size + PROOF_SIZE:
            return None
        self._responder_hello = bytes(self._buffer[: HELLO.size])
        proof = bytes(self._buffer[HELLO.size : HELLO.size + PROOF_SIZE])
        del self._buffer[: HELLO.size + PROOF_SIZE]
        peer = Hello.parse(self._responder_hello)
        if peer.version > self.version:
            raise RemoteProtocolError("responder chose a version we did not offer")
        if not hmac.compare_digest(proof, self._proof(RESPONDER_LABEL)):
            raise RemoteProtocolError("responder failed to prove the shared secret")
        self._negotiate(peer)
        self._outgoing.append(self._proof(INITIATOR_LABEL))
        self.state = State.READY
        return HandshakeComplete(self.version, self.capabilities)

    def _handshake_bytes_wanted(self) -> int:
        if self.state is State.AWAIT_PROOF:
            return PROOF_SIZE
        if self.role is Role.RESPONDER:
            return HELLO.size
        return HELLO.size + PROOF_SIZE

    # -- receiving -------------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray) -> None:
        """Add received bytes; ``b""`` means the peer closed its side."""
        if not data:
            self._eof = True
            return
        if self._eof:
            raise LocalProtocolError("data received after end of stream")
        if (
            not self._buffer
            and self._pending_header is not None
            and len(data) == self._pending_header.wire_length
        ):
            # Fast path: the adapter read exactly one payload; keep it without copying.
            self._payload = data
            return
        self._buffer += data

    def bytes_wanted(self) -> int:
        """How many more bytes complete the next event (adapters read exactly this many)."""
        if self.state in (State.AWAIT_HELLO, State.AWAIT_PROOF):
            return max(1, self._handshake_bytes_wanted() - len(self._buffer))
        if self._pending_header is None:
            return max(1, HEADER_SIZE - len(self._buffer))
        if self._payload is not None:
            return 1
        return max(1, self._pending_header.wire_length - len(self._buffer))

    def next_event(self) -> Event:
        if self.state is State.CLOSED:
            raise LocalProtocolError("connection is closed")
        if self.state is State.SEND_HELLO:
            raise LocalProtocolError("call initiate() first")
        if self.state in (State.AWAIT_HELLO, State.AWAIT_PROOF):
            event = self._handshake_step()
            if event is not None:
                return event
            if self.state in (State.AWAIT_HELLO, State.AWAIT_PROOF):
                return self._need_or_closed(self._handshake_bytes_wanted())
            return self.next_event()
        frame = self._next_frame()
        if frame is None:
            wanted = HEADER_SIZE if self._pending_header is None else self._pending_header.wire_length
            return self._need_or_closed(wanted)
        self._transition(frame, self.peer_role, RemoteProtocolError)
        return frame

    def _need_or_closed(self, wanted: int) -> Event:
        if self._eof:
            clean = not self._buffer and self._pending_header is None and self.state is State.READY
            self.state = State.CLOSED
            if clean:
                return ConnectionClosed()
            raise ConnectionLost("connection closed in the middle of a frame or transfer")
        return NeedData(max(1, wanted - len(self._buffer)))

    def _next_frame(self) -> Frame | None:
        if self._pending_header is None:
            if len(self._buffer) < HEADER_SIZE:
                return None
            self._pending_header = parse_header(memoryview(self._buffer)[:HEADER_SIZE])
            del self._buffer[:HEADER_SIZE]
        header = self._pending_header
        payload = self._payload
        if payload is not None:
            self._payload = None
        elif len(self._buffer) >= header.wire_length:
            payload = bytes(self._buffer[: header.wire_length])
            del self._buffer[: header.wire_length]
        else:
            return None
        self._pending_header = None
        return Frame(
            header.type,
            header.flags,
            header.codec,
            header.seq_or_offset,
            header.raw_length,
            header.wire_length,
            header.checksum,
            payload,
        )

    # -- sending ---------------------------------------------------------------------------------

    def send(self, frame: Frame) -> tuple[bytes, bytes | bytearray | memoryview]:
        """Account for sending ``frame``; returns (header, payload) to write in that order."""
        if self.state in (State.SEND_HELLO, State.AWAIT_HELLO, State.AWAIT_PROOF):
            raise LocalProtocolError("cannot send frames before the handshake completes")
        if len(frame.payload) != frame.wire_length:
            raise LocalProtocolError("frame payload does not match its wire_length")
        self._transition(frame, self.role, LocalProtocolError)
        return frame.header(), frame.payload

    def _transition(
        self,
        frame: Frame,
        sender: Role,
        error: type[LocalProtocolError] | type[RemoteProtocolError],
    ) -> None:
        next_state = TRANSITIONS.get((self.state, sender, frame.type))
        if next_state is None:
            raise error(f"{sender.value} may not send {frame.type.name} in state {self.state.value}")
        self.state = next_state

    def close(self) -> None:
        self.state = State.CLOSED
