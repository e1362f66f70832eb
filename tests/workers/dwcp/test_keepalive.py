"""The file streams' keepalives: a watched connection carries an ACK at least every second while it
streams, and a reader that waits longer than the silence limit is reported (two real channels over
loopback, authenticated, put into the streaming state by an OPEN and an ACCEPT)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from workers.dwcp import limits
from workers.dwcp.errors import ConnectionLost
from workers.dwcp.frames import FrameType, control_frame
from workers.dwcp.keepalive import LinkWatch
from workers.dwcp.transport import Channel

from .helpers import SECRET


@pytest.fixture
def streaming() -> Iterator[tuple[Channel, Channel]]:
    """(sender's channel, receiver's channel), both streaming."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[Channel] = []

    def accept() -> None:
        sock, peer = listener.accept()
        accepted.append(Channel.accept(sock, peer[:2], SECRET.encode()))

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    sender = Channel.connect(("127.0.0.1", listener.getsockname()[1]), SECRET.encode())
    thread.join(5)
    receiver = accepted[0]
    sender.send(control_frame(FrameType.OPEN, {}))
    assert (opened := receiver.receive()) is not None and opened.type is FrameType.OPEN
    receiver.send(control_frame(FrameType.ACCEPT, {}))
    assert (answer := sender.receive()) is not None and answer.type is FrameType.ACCEPT
    yield sender, receiver
    sender.close()
    receiver.close()
    listener.close()


def test_a_watched_connection_carries_an_ack_every_second_with_the_position(
    streaming: tuple[Channel, Channel],
) -> None:
    sender, receiver = streaming
    watch = LinkWatch(lambda _channel, _quiet: None, position=lambda: 42)
    watch.add(receiver)
    try:
        started = time.monotonic()
        acks: list[tuple[float, int]] = []
        while len(acks) < 2:
            frame = sender.receive()
            assert frame is not None and frame.type is FrameType.ACK
            acks.append((time.monotonic() - started, frame.seq_or_offset))
        assert [position for _, position in acks] == [42, 42]
        assert acks[1][0] < 2 * limits.TUNNEL_KEEPALIVE_SECONDS + 0.5
    finally:
        watch.stop()


def test_a_reader_waiting_past_the_silence_limit_is_reported_once(streaming: tuple[Channel, Channel]) -> None:
    _sender, receiver = streaming
    silent: list[float] = []

    def on_silent(channel: Channel, quiet: float) -> None:
        silent.append(quiet)
        channel.sock.shutdown(socket.SHUT_RDWR)  # what the session does: its reader sees the cut

    watch = LinkWatch(on_silent)
    watch.add(receiver)
    started = time.monotonic()
    try:
        with pytest.raises(ConnectionLost):  # the byte stream ended mid-transfer: a cut
            watch.receive(receiver)
    finally:
        watch.stop()
    assert len(silent) == 1
    assert limits.TUNNEL_LINK_SILENCE_SECONDS < silent[0] < limits.TUNNEL_LINK_SILENCE_SECONDS + 1
    assert time.monotonic() - started < limits.TUNNEL_LINK_SILENCE_SECONDS + 2
