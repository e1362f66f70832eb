"""Socket adapters on 127.0.0.1: tuned TCP, authentication, hostile and silent peers."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from workers.dwcp import DWCPServer, limits
from workers.dwcp.errors import RemoteProtocolError
from workers.dwcp.transport import (
    AVAILABLE_CONGESTION_CONTROLS,
    TCP_NOTSENT_LOWAT,
    Channel,
    ConnectionPool,
    congestion_control,
)

from .helpers import DEST, SECRET


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:  # closed with our unread bytes still in its buffer
        return True


def test_pooled_connections_are_tuned_for_bulk_transfer(server: DWCPServer, pool: ConnectionPool) -> None:
    channel = pool.acquire(server.address, SECRET.encode())
    sock = channel.sock
    # Linux reports twice the requested size (it counts its bookkeeping overhead).
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= limits.SOCKET_BUFFER_SIZE
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= limits.SOCKET_BUFFER_SIZE
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert sock.getsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT) == limits.NOTSENT_LOWAT_BYTES
    if b"bbr" in AVAILABLE_CONGESTION_CONTROLS:
        assert congestion_control(sock) == "bbr"
    pool.release(channel, SECRET.encode())
    assert pool.acquire(server.address, SECRET.encode()) is channel
    assert (pool.connects, pool.reuses) == (1, 1)


def test_a_client_with_the_wrong_secret_cannot_authenticate(server: DWCPServer) -> None:
    with pytest.raises(RemoteProtocolError, match="prove"):
        Channel.connect(server.address, b"definitely-not-the-secret")


def test_garbage_and_silence_are_dropped_and_the_server_keeps_serving(
    server: DWCPServer, pool: ConnectionPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(limits, "HANDSHAKE_TIMEOUT_SECONDS", 0.5)
    garbage = socket.create_connection(server.address)
    garbage.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 3)
    silent = socket.create_connection(server.address)
    garbage.settimeout(5)
    silent.settimeout(5)
    assert closed_by_peer(garbage)  # refused: not DWCP
    started = time.monotonic()
    assert closed_by_peer(silent)  # dropped after the handshake timeout
    assert time.monotonic() - started < 3
    channel = pool.acquire(server.address, SECRET.encode())
    assert channel.reusable()


def test_connections_beyond_the_limit_are_closed_at_once(
    root: Path, pool: ConnectionPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(limits, "MAX_CONNECTIONS", 1)
    with DWCPServer(listen="127.0.0.1:0", root=root, node_name=DEST, secret=SECRET) as server:
        first = pool.acquire(server.address, SECRET.encode())
        with pytest.raises((RemoteProtocolError, OSError)):
            Channel.connect(server.address, SECRET.encode())
        assert first.reusable()
        pool.release(first, SECRET.encode())
