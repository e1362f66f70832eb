"""The sans-I/O core: frame headers, the handshake and the state machine, fuzzed with hypothesis."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workers.dwcp import limits
from workers.dwcp.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from workers.dwcp.frames import (
    HEADER_SIZE,
    Codec,
    Frame,
    FrameType,
    control_frame,
    make_frame,
    parse_control,
    parse_header,
)
from workers.dwcp.protocol import (
    TRANSITIONS,
    Connection,
    ConnectionClosed,
    HandshakeComplete,
    NeedData,
    Role,
    State,
)

SECRET = b"protocol-test-secret-0123"
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def handshake(
    secret_initiator: bytes = SECRET, secret_responder: bytes = SECRET
) -> tuple[Connection, Connection]:
    initiator = Connection(Role.INITIATOR, secret_initiator)
    responder = Connection(Role.RESPONDER, secret_responder)
    responder.receive_data(initiator.initiate())
    assert isinstance(responder.next_event(), NeedData)
    initiator.receive_data(responder.data_to_send())
    assert isinstance(initiator.next_event(), HandshakeComplete)
    responder.receive_data(initiator.data_to_send())
    assert isinstance(responder.next_event(), HandshakeComplete)
    return initiator, responder


def deliver(sender: Connection, receiver: Connection, frame: Frame) -> Frame:
    header, payload = sender.send(frame)
    receiver.receive_data(header + bytes(payload))
    event = receiver.next_event()
    assert isinstance(event, Frame)
    return event


def test_frame_header_round_trips() -> None:
    frame = make_frame(FrameType.DATA, b"x" * 100, seq_or_offset=12345)
    parsed = parse_header(frame.header())
    assert (parsed.type, parsed.codec, parsed.seq_or_offset, parsed.raw_length, parsed.checksum) == (
        FrameType.DATA,
        Codec.RAW,
        12345,
        100,
        frame.checksum,
    )
    assert len(frame.header()) == HEADER_SIZE


def test_damaged_header_is_a_remote_protocol_error() -> None:
    header = bytearray(make_frame(FrameType.DATA, b"abc").header())
    header[10] ^= 1
    with pytest.raises(RemoteProtocolError, match="header check"):
        parse_header(bytes(header))


def test_oversized_data_frame_is_refused_before_allocation() -> None:
    with pytest.raises(LocalProtocolError):
        make_frame(FrameType.DATA, b"", codec=Codec.ZERO, raw_length=limits.MAX_CHUNK_SIZE + 1, checksum=0)


def test_handshake_with_the_same_secret_completes_and_negotiates() -> None:
    initiator, responder = handshake()
    assert initiator.state is State.READY and responder.state is State.READY
    assert initiator.capabilities == responder.capabilities


def test_handshake_with_a_wrong_secret_fails_on_both_sides() -> None:
    initiator = Connection(Role.INITIATOR, SECRET)
    responder = Connection(Role.RESPONDER, b"another-secret-entirely!")
    responder.receive_data(initiator.initiate())
    responder.next_event()
    initiator.receive_data(responder.data_to_send())
    with pytest.raises(RemoteProtocolError, match="prove"):
        initiator.next_event()


def test_a_transfer_walks_the_state_table_and_returns_to_ready() -> None:
    initiator, responder = handshake()
    deliver(initiator, responder, control_frame(FrameType.OPEN, {"ticket": "t"}))
    assert responder.state is State.OPENING
    deliver(responder, initiator, control_frame(FrameType.ACCEPT, {}))
    deliver(initiator, responder, make_frame(FrameType.DATA, b"payload"))
    deliver(initiator, responder, control_frame(FrameType.END, {}))
    assert initiator.state is State.DRAINING
    deliver(responder, initiator, control_frame(FrameType.RESULT, {"ok": True}))
    assert initiator.state is State.READY and responder.state is State.READY


def test_sending_data_before_open_is_a_local_error_and_receiving_it_a_remote_one() -> None:
    initiator, responder = handshake()
    frame = make_frame(FrameType.DATA, b"early")
    with pytest.raises(LocalProtocolError):
        initiator.send(frame)
    responder.receive_data(frame.header() + b"early")
    with pytest.raises(RemoteProtocolError):
        responder.next_event()


def test_every_transition_names_a_legal_sender() -> None:
    for (state, role, frame_type), next_state in TRANSITIONS.items():
        assert state is not State.CLOSED
        assert isinstance(role, Role) and isinstance(frame_type, FrameType) and isinstance(next_state, State)


def test_clean_close_while_idle_is_not_an_error_but_mid_frame_is() -> None:
    _initiator, responder = handshake()
    responder.receive_data(b"")
    assert isinstance(responder.next_event(), ConnectionClosed)
    _initiator2, responder2 = handshake()
    responder2.receive_data(b"\x01\x02\x03")
    responder2.receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        responder2.next_event()


def _drain(connection: Connection, data: bytes, splits: list[int]) -> None:
    """Feed ``data`` in pieces; every event must be a frame, NeedData, or a ProtocolError."""
    position = 0
    pieces = []
    for split in sorted(splits):
        pieces.append(data[position:split])
        position = max(position, split)
    pieces.append(data[position:])
    for piece in [*pieces, b""]:
        if connection.state is State.CLOSED:
            return
        connection.receive_data(piece)
        for _ in range(len(data) + 2):
            event = connection.next_event()
            if isinstance(event, NeedData):
                assert 0 < event.count <= limits.MAX_FRAME_PAYLOAD + HEADER_SIZE
                break
            if isinstance(event, ConnectionClosed):
                return
            assert isinstance(event, Frame | HandshakeComplete)
            assert len(event.payload) <= limits.MAX_FRAME_PAYLOAD if isinstance(event, Frame) else True


@FUZZ
@given(data=st.binary(max_size=600), splits=st.lists(st.integers(0, 600), max_size=6))
def test_fuzzed_bytes_to_a_fresh_responder_give_only_protocol_errors(data: bytes, splits: list[int]) -> None:
    with contextlib.suppress(ProtocolError):
        _drain(Connection(Role.RESPONDER, SECRET), data, splits)


@FUZZ
@given(data=st.binary(max_size=600), splits=st.lists(st.integers(0, 600), max_size=6))
def test_fuzzed_bytes_after_the_handshake_give_only_protocol_errors(data: bytes, splits: list[int]) -> None:
    _, responder = handshake()
    with contextlib.suppress(ProtocolError):
        _drain(responder, data, splits)


@FUZZ
@given(data=st.binary(max_size=300), splits=st.lists(st.integers(0, 300), max_size=4))
def test_fuzzed_bytes_as_a_responder_hello_give_only_protocol_errors(data: bytes, splits: list[int]) -> None:
    initiator = Connection(Role.INITIATOR, SECRET)
    initiator.initiate()
    with contextlib.suppress(ProtocolError):
        _drain(initiator, data, splits)
    assert initiator.state is not State.READY or data[:4] == b"DWCP"


@FUZZ
@given(data=st.binary(min_size=HEADER_SIZE, max_size=HEADER_SIZE))
def test_fuzzed_headers_parse_or_raise_remote_protocol_error(data: bytes) -> None:
    try:
        frame = parse_header(data)
    except RemoteProtocolError:
        return
    assert frame.wire_length <= limits.MAX_FRAME_PAYLOAD


@FUZZ
@given(
    frame_type=st.sampled_from(FrameType),
    codec=st.sampled_from(Codec),
    seq=st.integers(0, 2**64 - 1),
    raw_length=st.integers(0, 2**32 - 1),
    wire_length=st.integers(0, 2**32 - 1),
    checksum=st.integers(0, 2**64 - 1),
)
def test_well_formed_headers_with_hostile_lengths_never_exceed_limits(
    frame_type: FrameType, codec: Codec, seq: int, raw_length: int, wire_length: int, checksum: int
) -> None:
    header = Frame(frame_type, codec=codec, seq_or_offset=seq, raw_length=raw_length, wire_length=wire_length)
    header = Frame(frame_type, header.flags, codec, seq, raw_length, wire_length, checksum)
    try:
        parsed = parse_header(header.header())
    except RemoteProtocolError:
        return
    assert parsed.wire_length <= limits.MAX_FRAME_PAYLOAD
    if parsed.type is FrameType.DATA:
        assert parsed.raw_length <= limits.MAX_CHUNK_SIZE


@FUZZ
@given(payload=st.binary(max_size=300) | st.text(max_size=100).map(str.encode))
def test_fuzzed_control_payloads_parse_or_raise_remote_protocol_error(payload: bytes) -> None:
    frame = make_frame(FrameType.OPEN, payload)
    try:
        message = parse_control(frame)
    except RemoteProtocolError:
        return
    for getter in (
        lambda: message.text("ticket"),
        lambda: message.integer("streams", low=1, high=16),
        lambda: message.ranges("held", limit=100),
        lambda: message.flag("index"),
    ):
        with contextlib.suppress(RemoteProtocolError):
            getter()
