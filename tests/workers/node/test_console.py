"""The node's console multiplexer (``workers.node.console``) against a unix socket standing in for
QEMU's console chardev (one client at a time, as QEMU's): scrollback from serial.log, fan-out, input
from every viewer, a viewer that stops reading, and the socket let go when the last viewer leaves."""

from __future__ import annotations

import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from workers.dwcp import TransferError
from workers.node.console import VIEWER_BACKLOG_BYTES, ConsoleManager
from workers.qemu.layout import NodeLayout

VM = "5f0c3f0e-8d6b-4b1e-a3f2-0c9d7e6b5a41"


class FakeChardev:
    """QEMU's side of ``console.sock``: accepts one client at a time, records what it is sent."""

    def __init__(self, path: Path) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.received = bytearray()
        self.clients = 0
        self.client: socket.socket | None = None
        self.client_left = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.clients += 1
            self.client = client
            self.client_left.clear()
            with client:
                while data := client.recv(4096):
                    self.received += data
            self.client_left.set()

    def wait_client(self) -> socket.socket:
        deadline = time.monotonic() + 5
        while self.client is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.client is not None
        return self.client

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def run_dir() -> Iterator[Path]:
    data_dir = Path(tempfile.mkdtemp(prefix="nc-"))  # unix socket paths must stay short
    directory = NodeLayout(data_dir).vm(VM).run_dir
    directory.mkdir(parents=True)
    yield directory
    shutil.rmtree(data_dir, ignore_errors=True)


def _read(viewer: socket.socket, count: int, timeout: float = 5) -> bytes:
    viewer.settimeout(timeout)
    data = bytearray()
    while len(data) < count:
        chunk = viewer.recv(count - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def test_viewers_get_the_scrollback_then_the_same_output_and_all_type_to_the_guest(run_dir: Path) -> None:
    (run_dir / "serial.log").write_bytes(b"old line\n" * 10_000)  # more than the scrollback keeps
    chardev = FakeChardev(run_dir / "console.sock")
    manager = ConsoleManager(NodeLayout(run_dir.parents[1]))
    try:
        first = manager.attach(VM)
        scrollback = _read(first, 64 * 1024)
        assert len(scrollback) == 64 * 1024 and scrollback.endswith(b"old line\n")
        guest = chardev.wait_client()
        second = manager.attach(VM)
        assert _read(second, 64 * 1024) == scrollback  # the same recent output, not a second connection
        guest.sendall(b"live output\n")
        assert _read(first, 12) == _read(second, 12) == b"live output\n"
        first.sendall(b"from one\n")
        second.sendall(b"from two\n")
        deadline = time.monotonic() + 5
        while len(chardev.received) < 18 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sorted(bytes(chardev.received).splitlines()) == [b"from one", b"from two"]
        assert chardev.clients == 1

        guest.shutdown(socket.SHUT_RDWR)  # QEMU quits: every viewer sees the end
        assert _read(first, 1) == b"" and _read(second, 1) == b""
    finally:
        chardev.close()
        manager.stop()


def test_a_viewer_that_stops_reading_is_dropped_and_the_last_one_leaving_lets_the_socket_go(
    run_dir: Path,
) -> None:
    chardev = FakeChardev(run_dir / "console.sock")
    manager = ConsoleManager(NodeLayout(run_dir.parents[1]))
    try:
        stuck = manager.attach(VM)
        reader = manager.attach(VM)
        guest = chardev.wait_client()
        flood = b"x" * (3 * VIEWER_BACKLOG_BYTES)
        received = bytearray()

        def read_all() -> None:
            received.extend(_read(reader, len(flood), timeout=20))

        thread = threading.Thread(target=read_all)
        thread.start()
        guest.sendall(flood)
        thread.join(30)
        assert bytes(received) == flood  # the reader got everything, never held back by the stuck one
        stuck.settimeout(5)
        while stuck.recv(1 << 20):  # what was already buffered for it, then the end
            pass

        reader.close()
        assert chardev.client_left.wait(5)  # no viewer left: QEMU's socket is free again
        with pytest.raises(TransferError, match="is not a VM uuid"):
            manager.attach("../../etc")
    finally:
        chardev.close()
        manager.stop()


def test_a_vm_without_a_console_socket_is_refused(run_dir: Path) -> None:
    manager = ConsoleManager(NodeLayout(run_dir.parents[1]))
    with pytest.raises(TransferError) as refused:
        manager.attach(VM)
    assert refused.value.code == "no_console" and VM in str(refused.value)
