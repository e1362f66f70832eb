"""Tunnels across a cut link: two real endpoints over loopback through a TCP relay (the "link") that
the test resets or blackholes. Data must arrive byte-exact and in order, resent bytes stay within
the replay window, a forged RESUME is refused, an outage above the limit fails both ends with the
reason, and a new ticket for the target of a cut tunnel supersedes it."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from workers.dwcp import (
    CallbackReporter,
    DWCPServer,
    Progress,
    TransferInterrupted,
    TransferRefused,
    Tunnel,
    codecs,
    open_tunnel,
)
from workers.dwcp.control import TransferControl
from workers.dwcp.frames import FrameType, make_frame
from workers.dwcp.progress import ProgressTracker
from workers.dwcp.sender import negotiate
from workers.dwcp.transport import Channel, ConnectionPool, parse_address
from workers.dwcp.tunnel import TunnelEndpoint

from .helpers import DEST, SECRET, SOURCE, Link, MiB, wait_for

WINDOW = 4 * MiB


class EchoTarget:
    """The far end's unix socket (QEMU's NBD export, say): echoes every connection back."""

    def __init__(self, path: Path) -> None:
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(4)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(connection,), daemon=True).start()

    @staticmethod
    def _echo(connection: socket.socket) -> None:
        with contextlib.suppress(OSError), connection:
            while data := connection.recv(65536):
                connection.sendall(data)
            connection.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._listener.close()


def exchange(path: Path, payload: bytes) -> tuple[threading.Thread, list[bytes]]:
    """Connect to the tunnel's local socket, write ``payload`` and collect the echo (in a thread)."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(str(path))
    received: list[bytes] = []

    def write() -> None:
        with contextlib.suppress(OSError):  # a tunnel that failed closes its local socket
            client.sendall(payload)
            client.shutdown(socket.SHUT_WR)

    def run() -> None:
        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        chunks = []
        with contextlib.suppress(OSError):  # a tunnel that failed closes its local socket
            while data := client.recv(1 << 20):
                chunks.append(data)
        writer.join()
        client.close()
        received.append(b"".join(chunks))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, received


def tunnel_to(address: str, local_path: Path, ticket: Callable[..., str], **options: Any) -> Tunnel:
    """A tunnel from ``local_path`` to the server's ``nbd.sock`` through ``address``."""
    return open_tunnel(
        address=address,
        local_path=local_path,
        ticket=ticket("nbd.sock", kind="tunnel"),
        secret=SECRET,
        source_node=SOURCE,
        pool=ConnectionPool(tls=None),
        **options,
    )


def carrying(link: Link, root: Path, local_path: Path, ticket: Callable[..., str]) -> Tunnel:
    """A one-stream tunnel through ``link`` to an echo target, 20 MiB on their way (2 MiB across)."""
    EchoTarget(root / "nbd.sock")
    tunnel = tunnel_to(link.address, local_path, ticket, streams=1)
    exchange(local_path, os.urandom(20 * MiB))
    wait_for(lambda: link.forwarded > 2 * MiB, 20, "the first bytes")
    return tunnel


def test_a_tunnel_survives_a_reset_and_a_blackhole_byte_exact_and_in_order(
    outage_server: DWCPServer, link: Link, root: Path, tmp_path: Path, ticket: Callable[..., str]
) -> None:
    EchoTarget(root / "nbd.sock")
    progress: list[Progress] = []
    tunnel = tunnel_to(
        link.address,
        tmp_path / "local.sock",
        ticket,
        streams=4,
        reporter=CallbackReporter(progress.append),
        link_outage_seconds=12,
        replay_window=WINDOW,
    )
    # Incompressible (every byte crosses the relay) and position-dependent (a frame out of order or
    # twice changes the digest).
    payload = b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() + os.urandom(992) for i in range(24_000))
    thread, received = exchange(tmp_path / "local.sock", payload)

    wait_for(lambda: link.forwarded > 6 * MiB, 20, "the first bytes")
    link.reset()
    wait_for(lambda: link.forwarded > 20 * MiB, 30, "bytes after the reset")
    link.blackhole()
    time.sleep(6)  # past the 4 s of silence that declares the link dead
    outage_seen = [p for p in progress if p.phase == "reconnecting"]
    link.restore()

    thread.join(timeout=60)
    result = tunnel.wait(timeout=30)
    assert received == [payload]
    assert result.bytes_sent == result.bytes_received == len(payload)
    assert len(result.outages) == 2
    assert 1 < result.outages[1] < 12  # from the 4 s of silence to the reconnect
    # Nothing is sent again that had left the replay window: each cut resends at most a window.
    assert 0 < result.bytes_resent <= len(result.outages) * WINDOW
    assert outage_seen and outage_seen[-1].outage_seconds is not None
    assert outage_seen[-1].outage_seconds > 0.5
    wait_for(lambda: not outage_server.active_transfers(), 10, "the server's session to end")


def test_the_receiver_drops_frames_it_already_holds() -> None:
    local, far = socket.socketpair()
    endpoint = TunnelEndpoint(
        local,
        policy=codecs.AdaptivePolicy(codecs.CodecMode.RAW, writers=1, allow_lz4=False, allow_zstd=False),
        control=TransferControl(),
        tracker=ProgressTracker("dup", total_bytes=None),
    )
    try:
        for seq, data in ((1, b"second"), (1, b"second"), (0, b"first "), (0, b"first "), (1, b"second")):
            endpoint.receive_frame(make_frame(FrameType.DATA, data, seq_or_offset=seq))
        endpoint.receive_frame(make_frame(FrameType.EOF, seq_or_offset=2))
        far.settimeout(5)
        delivered = b""
        while chunk := far.recv(100):
            delivered += chunk
        assert delivered == b"first second"
        assert endpoint.duplicates_dropped == 3
        wait_for(lambda: endpoint.delivered == 3, 5, "the EOF counted as delivered")
    finally:
        endpoint.close()
        far.close()


def test_a_resume_without_the_session_key_is_refused(
    outage_server: DWCPServer, link: Link, root: Path, tmp_path: Path, ticket: Callable[..., str]
) -> None:
    tunnel = carrying(link, root, tmp_path / "local.sock", ticket)
    link.blackhole()
    wait_for(lambda: tunnel.transfer_id in outage_server.active_transfers(), 5, "the session")
    time.sleep(5)  # both ends have declared the link dead
    forger = Channel.connect(parse_address(outage_server.address_text), SECRET.encode())
    with pytest.raises(TransferRefused, match=r"no transfer .* to resume with that key"):
        negotiate(
            forger,
            FrameType.RESUME,
            {"transfer_id": tunnel.transfer_id, "session_key": "0" * 32, "stream": 0, "next_seq": 0},
        )
    forger.close()
    link.restore()
    tunnel.wait(timeout=60)  # the real client still resumes


def test_an_outage_above_the_limit_fails_both_ends_with_the_reason(
    root: Path, tmp_path: Path, ticket: Callable[..., str]
) -> None:
    EchoTarget(root / "nbd.sock")
    with DWCPServer(
        listen="127.0.0.1:0", root=root, node_name=DEST, secret=SECRET, link_outage_seconds=3
    ) as server:
        relay = Link(server.address)
        tunnel = tunnel_to(
            relay.address,
            tmp_path / "local.sock",
            ticket,
            streams=2,
            link_outage_seconds=3,
        )
        thread, received = exchange(tmp_path / "local.sock", os.urandom(30 * MiB))
        wait_for(lambda: relay.forwarded > 2 * MiB, 20, "the first bytes")
        relay.blackhole()
        started = time.monotonic()
        with pytest.raises(
            TransferInterrupted, match=r"link to node-b down for \d+ s, above the limit of 3 s"
        ):
            tunnel.wait(timeout=30)
        assert time.monotonic() - started < 4 + 3 + 3 + 2  # silence, limit, a reconnect attempt
        thread.join(timeout=10)
        assert received and len(received[0]) < 30 * MiB  # the local client saw the tunnel end
        wait_for(lambda: not server.active_transfers(), 10, "the server to give the session up")
        relay.close()


def test_a_new_ticket_supersedes_a_cut_tunnel_holding_its_target(
    outage_server: DWCPServer, link: Link, root: Path, tmp_path: Path, ticket: Callable[..., str]
) -> None:
    dead_source = carrying(link, root, tmp_path / "dead.sock", ticket)
    link.close()  # the source is gone for good: it never comes back to resume
    wait_for(lambda: dead_source.transfer_id in outage_server.active_transfers(), 5, "the cut session")
    time.sleep(0.5)
    started = time.monotonic()
    successor = tunnel_to(
        outage_server.address_text,
        tmp_path / "next.sock",
        ticket,
        streams=2,
    )
    payload = os.urandom(2 * MiB)
    thread, received = exchange(tmp_path / "next.sock", payload)
    thread.join(timeout=20)
    assert received == [payload]
    assert successor.wait(timeout=10).bytes_received == len(payload)
    assert time.monotonic() - started < 10  # not the outage limit (12 s)
    assert dead_source.transfer_id not in outage_server.active_transfers()
    dead_source.close()
