"""The synchronous QMP session facing broken peers: every failure is a QmpError with a clear message.

Real QEMU never sends malformed QMP, so these tests talk to small unix-socket servers that misbehave
in one specific way each; the driver's happy paths are covered against real QEMU in test_driver.py.
"""

from __future__ import annotations

import contextlib
import json
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from workers.qemu import QmpCommandError, QmpConnectError, QmpProtocolError, QmpSession, QmpTimeout
from workers.qemu.qmp import EventLoopThread

GREETING = {
    "QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": []}
}

Behaviour = Callable[[socket.socket, "LineReader"], None]


class LineReader:
    """Reads the client's commands: JSON objects back to back (qemu.qmp sends no newline after them)."""

    def __init__(self, connection: socket.socket) -> None:
        self._connection = connection
        self._buffer = ""
        self._decoder = json.JSONDecoder()

    def command(self) -> dict:
        while True:
            text = self._buffer.lstrip()
            if text:
                try:
                    message, end = self._decoder.raw_decode(text)
                except ValueError:
                    pass  # incomplete: read more
                else:
                    self._buffer = text[end:]
                    return message
            chunk = self._connection.recv(4096)
            if not chunk:
                raise EOFError("client hung up")
            self._buffer += chunk.decode()


def send(connection: socket.socket, message: object) -> None:
    connection.sendall(json.dumps(message).encode() + b"\r\n")


def negotiate(connection: socket.socket, reader: LineReader) -> None:
    send(connection, GREETING)
    command = reader.command()
    send(connection, {"return": {}, "id": command.get("id")})


@pytest.fixture
def loop() -> Iterator[EventLoopThread]:
    thread = EventLoopThread()
    yield thread
    thread.close()


@pytest.fixture
def fake_qemu() -> Iterator[Callable[[Behaviour], Path]]:
    """Start a one-connection QMP server on a unix socket that behaves as told; returns its path."""
    directory = Path(tempfile.mkdtemp(prefix="ncq-qmp-", dir="/tmp"))
    servers: list[socket.socket] = []

    def start(behaviour: Behaviour) -> Path:
        path = directory / f"qmp{len(servers)}.sock"
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(path))
        server.listen(1)
        servers.append(server)

        def serve() -> None:
            try:
                connection, _ = server.accept()
            except OSError:
                return
            with connection, contextlib.suppress(OSError, EOFError):
                behaviour(connection, LineReader(connection))

        threading.Thread(target=serve, daemon=True).start()
        return path

    yield start
    for server in servers:
        server.close()
    for leftover in directory.iterdir():
        leftover.unlink()
    directory.rmdir()


def test_a_malformed_reply_is_a_protocol_error(fake_qemu, loop):
    def garbage_reply(connection: socket.socket, reader: LineReader) -> None:
        negotiate(connection, reader)
        reader.command()
        connection.sendall(b"this is not json\r\n")
        reader.command()  # hold the connection until the client hangs up

    session = QmpSession(fake_qemu(garbage_reply), loop, timeout=3)
    with pytest.raises(QmpProtocolError, match="query-status"):
        session.execute("query-status")
    session.close()


def test_a_reply_that_is_not_an_object_is_a_protocol_error(fake_qemu, loop):
    def list_reply(connection: socket.socket, reader: LineReader) -> None:
        negotiate(connection, reader)
        reader.command()
        connection.sendall(b"[1, 2, 3]\r\n")
        reader.command()

    session = QmpSession(fake_qemu(list_reply), loop, timeout=3)
    with pytest.raises(QmpProtocolError):
        session.execute("query-status")
    session.close()


def test_a_server_that_hangs_up_mid_command_is_a_protocol_error(fake_qemu, loop):
    def hang_up(connection: socket.socket, reader: LineReader) -> None:
        negotiate(connection, reader)
        reader.command()

    session = QmpSession(fake_qemu(hang_up), loop, timeout=3)
    with pytest.raises(QmpProtocolError, match="closed before QEMU answered 'quit'"):
        session.execute("quit")
    session.close()


def test_an_error_reply_keeps_the_qmp_error_class_and_description(fake_qemu, loop):
    def refuse(connection: socket.socket, reader: LineReader) -> None:
        negotiate(connection, reader)
        command = reader.command()
        send(connection, {"error": {"class": "GenericError", "desc": "no can do"}, "id": command["id"]})
        reader.command()

    session = QmpSession(fake_qemu(refuse), loop, timeout=3)
    with pytest.raises(QmpCommandError) as raised:
        session.execute("system_reset")
    assert (raised.value.error_class, raised.value.desc) == ("GenericError", "no can do")
    assert str(raised.value) == "QMP command 'system_reset' failed: GenericError: no can do"
    session.close()


def test_a_monitor_that_never_greets_times_out_naming_the_likely_cause(fake_qemu, loop):
    def silent(connection: socket.socket, reader: LineReader) -> None:
        reader.command()  # blocks until the client gives up and closes

    session = QmpSession(fake_qemu(silent), loop, timeout=0.5)
    with pytest.raises(QmpConnectError, match="another client probably holds its monitor"):
        session.connect()


def test_a_missing_socket_is_a_connect_error(loop, tmp_path):
    session = QmpSession(tmp_path / "absent.sock", loop, timeout=1)
    with pytest.raises(QmpConnectError, match="cannot connect QMP"):
        session.execute("query-status")


def test_a_command_without_an_answer_times_out(fake_qemu, loop):
    def mute_after_negotiation(connection: socket.socket, reader: LineReader) -> None:
        negotiate(connection, reader)
        reader.command()
        reader.command()

    session = QmpSession(fake_qemu(mute_after_negotiation), loop, timeout=3)
    with pytest.raises(QmpTimeout, match=r"did not answer within 0\.3 s"):
        session.execute("query-status", timeout=0.3)
    session.close()


def test_events_are_buffered_between_calls_and_waited_for_by_mark(fake_qemu, loop):
    def emit(connection: socket.socket, reader: LineReader) -> None:
        negotiate(connection, reader)
        command = reader.command()
        send(connection, {"event": "STOP", "data": {}, "timestamp": {"seconds": 1, "microseconds": 5}})
        send(connection, {"return": {}, "id": command["id"]})
        command = reader.command()
        send(connection, {"return": {}, "id": command["id"]})
        send(connection, {"event": "RESUME", "timestamp": {"seconds": 2, "microseconds": 0}})
        reader.command()

    session = QmpSession(fake_qemu(emit), loop, timeout=3)
    mark = session.event_mark()
    session.execute("stop")
    assert session.wait_event("STOP", after=mark, timeout=2).timestamp == pytest.approx(1.000005)
    second_mark = session.event_mark()
    session.execute("cont")
    resume = session.wait_event(["RESUME", "SHUTDOWN"], after=second_mark, timeout=2)
    assert (resume.name, dict(resume.data)) == ("RESUME", {})
    assert [event.name for event in session.events_since(mark)] == ["STOP", "RESUME"]
    with pytest.raises(QmpTimeout, match="no SHUTDOWN event"):
        session.wait_event("SHUTDOWN", after=mark, timeout=0.2)
    session.close()
