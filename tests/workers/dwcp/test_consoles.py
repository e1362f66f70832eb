"""``console`` tickets: the server hands them to its console provider, several viewers at a time."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from workers.dwcp import DWCPServer, TransferError, TransferRefused, Tunnel, limits, open_tunnel, send_file

from .helpers import DEST, SECRET, SOURCE

VM = "0b5e9f3c-5a2d-4c1e-9f00-3d8f6c1a2b7e"


class ShoutingConsoles:
    """A provider whose one VM answers every line in upper case (the far end, as QEMU's console is)."""

    def attach(self, vm_uuid: str) -> socket.socket:
        if vm_uuid != VM:
            raise TransferError(f"VM {vm_uuid} has no running console here", code="no_console")
        ours, theirs = socket.socketpair()
        threading.Thread(target=self._serve, args=(ours,), daemon=True).start()
        return theirs

    @staticmethod
    def _serve(connection: socket.socket) -> None:
        with connection:
            while data := connection.recv(4096):
                connection.sendall(data.upper())


def _viewer(address: str, path: Path, token: str) -> tuple[socket.socket, Tunnel]:
    tunnel = open_tunnel(
        address=address, local_path=path, ticket=token, secret=SECRET, source_node=SOURCE, streams=1
    )
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(str(path))
    client.settimeout(10)
    return client, tunnel


def test_several_viewers_hold_one_vms_console_at_once(
    root: Path, tmp_path: Path, ticket: Callable[..., str]
) -> None:
    with DWCPServer(
        listen="127.0.0.1:0", root=root, node_name=DEST, secret=SECRET, consoles=ShoutingConsoles()
    ) as server:
        viewers = [
            _viewer(server.address_text, tmp_path / f"v{n}.sock", ticket(VM, kind="console"))
            for n in range(3)
        ]
        for number, (client, _) in enumerate(viewers):
            client.sendall(f"hello {number}\n".encode())
            assert client.recv(100) == f"HELLO {number}\n".encode()
        for client, tunnel in viewers:
            client.shutdown(socket.SHUT_WR)
            assert client.recv(100) == b""
            client.close()
            tunnel.wait(10)


def test_a_console_ticket_is_refused_for_a_vm_not_served_or_by_a_server_without_consoles(
    server: DWCPServer, root: Path, tmp_path: Path, ticket: Callable[..., str]
) -> None:
    with DWCPServer(
        listen="127.0.0.1:0", root=root, node_name=DEST, secret=SECRET, consoles=ShoutingConsoles()
    ) as serving:
        other = "7c6f0e1e-2f4b-4f51-8d83-7d2a9ad1f0c4"
        client, tunnel = _viewer(serving.address_text, tmp_path / "other.sock", ticket(other, kind="console"))
        assert client.recv(100) == b""
        with pytest.raises(TransferRefused) as refused:
            tunnel.wait(10)
        assert refused.value.code == "no_console" and other in str(refused.value)
    client, tunnel = _viewer(server.address_text, tmp_path / "none.sock", ticket(VM, kind="console"))
    assert client.recv(100) == b""
    with pytest.raises(TransferRefused) as refused:
        tunnel.wait(10)
    assert refused.value.code == "bad_target" and "serves no consoles" in str(refused.value)


def test_consoles_have_a_budget_of_their_own_and_never_keep_a_transfer_out(
    root: Path, tmp_path: Path, ticket: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(limits, "MAX_SESSIONS", 1)
    monkeypatch.setattr(limits, "MAX_CONSOLE_SESSIONS", 2)
    with DWCPServer(
        listen="127.0.0.1:0", root=root, node_name=DEST, secret=SECRET, consoles=ShoutingConsoles()
    ) as server:
        viewers = [
            _viewer(server.address_text, tmp_path / f"v{n}.sock", ticket(VM, kind="console"))
            for n in range(2)
        ]
        for client, _ in viewers:
            client.sendall(b"here\n")
            assert client.recv(100) == b"HERE\n"
        client, tunnel = _viewer(server.address_text, tmp_path / "third.sock", ticket(VM, kind="console"))
        assert client.recv(100) == b""
        with pytest.raises(TransferRefused) as refused:
            tunnel.wait(10)
        assert refused.value.code == "busy" and "consoles" in str(refused.value)
        data = tmp_path / "disk.img"
        data.write_bytes(b"x" * 100_000)
        result = send_file(  # the one transfer slot is free whatever the consoles hold
            data,
            address=server.address_text,
            name="disk.img",
            ticket=ticket("disk.img"),
            secret=SECRET,
            source_node=SOURCE,
        )
        assert result.raw_bytes == 100_000 and (root / "disk.img").read_bytes() == data.read_bytes()
        for client, tunnel in viewers:
            client.close()
            tunnel.wait(10)
