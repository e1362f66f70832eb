"""Open VM consoles beside the API load (``bench.py --consoles N``).

Everything from the WebSocket to the node's console socket is the real code: tickets from
``POST /api/v1/vms/{id}/console/`` on the API server, the console WebSocket of the streams service
(``apps.streams.console``), DWCP ``console`` tunnels signed by it, and on the node side a real
:class:`~workers.dwcp.DWCPServer` with the node's real :class:`~workers.node.console.ConsoleManager`
(per :class:`ConsoleNode`, in this process, on a data dir of its own). Only the guests are played:
:class:`StandInGuest` listens on each VM's ``console.sock`` as QEMU's console chardev does and behaves
as a serial line with a shell on it (what is typed is echoed, ``echo ok <token>`` answers
``ok <token>``, a line of output every second). QEMU/TCG guests would take the CPU that the API
load measures; a stand-in costs next to nothing, so the figures show what the consoles cost the
control plane.

:class:`ConsoleLoad` holds the N WebSockets from one asyncio loop (a thread of its own, as
``streams.StreamLoad``; the WebSocket protocol is ``wsproto``'s, over asyncio streams) and, while
the load runs, types a command on each console every ``TYPE_SECONDS`` and times its answer.
Invariants: a node's DWCP server holds at most ``limits.MAX_CONSOLE_SESSIONS`` consoles, and the
consoles are spread over nodes (``CONSOLES_PER_NODE``) as a fleet's are; the spread stays within the streams
service's ``CONSOLE_MAX_PER_VM`` and ``CONSOLE_MAX_PER_USER`` (``VIEWERS_PER_VM``, ``VMS_PER_USER``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import select
import shutil
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    RejectConnection,
    Request,
    TextMessage,
)

from workers.dwcp import DWCPServer, limits
from workers.node.console import ConsoleManager
from workers.qemu.layout import NodeLayout

NAME_PREFIX = "bench-console"  # the nodes' and VMs' names: removed by remove_rows()
# Two viewers share each VM's console, so the node's fan-out is measured too (CONSOLE_MAX_PER_VM: 16).
VIEWERS_PER_VM = 2
# Each user owns this many of the watched VMs: 4 consoles each (CONSOLE_MAX_PER_USER: 10).
VMS_PER_USER = 2
# Consoles per node: each is one console session on its VM's node (MAX_CONSOLE_SESSIONS: 256).
CONSOLES_PER_NODE = 50
TYPE_SECONDS = 2.0  # each console types a command this often
ANSWER_WAIT_SECONDS = 5.0  # after the load: how long the last commands' answers may take
OPEN_TIMEOUT_SECONDS = 60.0
READ_SIZE = 64 * 1024

assert CONSOLES_PER_NODE < limits.MAX_CONSOLE_SESSIONS


# --- The node side --------------------------------------------------------------------------------


def _readable(sock: socket.socket, timeout: float) -> bool:
    """Whether ``sock`` has something to read (or ended) within ``timeout`` seconds. ``poll``, not
    ``select``: the bench process holds well over 1024 descriptors (streams, tunnels, DWCP)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


class StandInGuest:
    """A VM's serial line as QEMU's console chardev serves it (one client at a time, on
    ``console.sock``), with a shell with echo behind it: what is typed comes back (a carriage return
    as CR LF), a line ``echo ok <token>`` is answered ``ok <token>``, and a line of output is printed
    every second while a client is connected."""

    def __init__(self, path: Path, name: str) -> None:
        self.name = name
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(os.fspath(path))
        os.chmod(path, 0o600)
        self._listener.listen(1)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"guest-{name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with self._listener:
            while not self._stopping.is_set():
                if _readable(self._listener, 0.5):
                    client, _ = self._listener.accept()
                    with client, contextlib.suppress(OSError):
                        self._serve(client)

    def _serve(self, client: socket.socket) -> None:
        line = bytearray()
        started = time.monotonic()
        next_tick = started + 1.0
        while not self._stopping.is_set():
            output = bytearray()
            if _readable(client, max(0.0, min(0.5, next_tick - time.monotonic()))):
                typed = client.recv(4096)
                if not typed:
                    return  # the node's console multiplexer let the console go
                for byte in typed:
                    if byte in b"\r\n":
                        output += b"\r\n"
                        command = line.decode(errors="replace").strip()
                        if command.startswith("echo "):
                            output += command.removeprefix("echo ").encode() + b"\r\n"
                        output += b"$ "
                        line.clear()
                    else:
                        output.append(byte)
                        line.append(byte)
            now = time.monotonic()
            if now >= next_tick:
                output += f"[{now - started:9.3f}] {self.name}: tick {round(now - started)}\r\n".encode()
                next_tick += 1.0
            if output:
                client.sendall(output)

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)


class ConsoleNode:
    """A node as far as consoles go: the real DWCP server and console manager of ``workers.node`` on a
    data dir of its own (a short temporary path: unix socket paths are limited), and a
    :class:`StandInGuest` on the console socket of each of ``vm_ids``."""

    def __init__(self, name: str, vm_ids: list[str], secret: str) -> None:
        self.name = name
        self.vm_ids = vm_ids
        self.data_dir = Path(tempfile.mkdtemp(prefix="nc-con-"))
        layout = NodeLayout(self.data_dir)
        layout.ensure()
        self.guests: list[StandInGuest] = []
        for vm_id in vm_ids:
            paths = layout.vm(vm_id)
            paths.run_dir.mkdir(mode=0o700)
            self.guests.append(StandInGuest(paths.console_socket, f"vm-{vm_id[:8]}"))
        self.consoles = ConsoleManager(layout)
        self.server = DWCPServer(
            listen="127.0.0.1:0",
            root=self.data_dir,
            node_name=name,
            secret=secret,
            tunnel_root=layout.run_root,
            consoles=self.consoles,
        ).start()

    def stop(self) -> None:
        self.server.stop()
        self.consoles.stop()
        for guest in self.guests:
            guest.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)


def register_rows(node: ConsoleNode, owners: dict[str, int]) -> None:
    """The rows of ``node`` (up, at its DWCP address) and of its VMs (running there, each owned by
    ``owners[vm_id]``, in that user's personal project) in the database."""
    from django.contrib.auth import get_user_model

    from apps.projects.services import personal_project
    from apps.vms.choices import VMState
    from apps.vms.models import VM, Image, Node

    row = Node.objects.create(
        name=node.name,
        address="127.0.0.1",
        dwcp_address=node.server.address_text,
        vcpus=64,
        memory_mb=1 << 20,
        disk_gb=1 << 20,
    )
    image = Image.objects.order_by("pk").first() or Image.objects.create(
        name=f"{NAME_PREFIX}-image", path=f"/var/lib/novacron/images/{NAME_PREFIX}.qcow2"
    )
    users = get_user_model().objects.in_bulk(set(owners.values()))
    VM.objects.bulk_create(
        VM(
            id=vm_id,
            name=f"{NAME_PREFIX}-{index}",
            owner=users[owners[vm_id]],
            project=personal_project(users[owners[vm_id]]),
            node=row,
            image=image,
            state=VMState.RUNNING,
            vcpus=1,
            memory_mb=512,
            disk_gb=10,
        )
        for index, vm_id in enumerate(node.vm_ids)
    )


def remove_rows() -> None:
    """Remove the console nodes and their VMs (this run's, or a kept database's from a run that failed)."""
    from apps.vms.models import VM, Node

    VM.objects.filter(node__name__startswith=NAME_PREFIX).delete()
    Node.objects.filter(name__startswith=NAME_PREFIX).delete()


@dataclass(frozen=True)
class ConsoleSlot:
    """One console to hold: the VM, and the API token of the user who asks for its ticket."""

    vm_id: str
    token: str


@dataclass(frozen=True)
class Spread:
    """How N consoles are laid out: VMs, their owners and nodes (see the module's invariants)."""

    consoles: int

    @property
    def vms(self) -> int:
        return math.ceil(self.consoles / VIEWERS_PER_VM)

    @property
    def users(self) -> int:
        return math.ceil(self.vms / VMS_PER_USER)

    @property
    def nodes(self) -> int:
        return math.ceil(self.consoles / CONSOLES_PER_NODE)

    def vm_of(self, console: int) -> int:
        return console // VIEWERS_PER_VM

    def user_of(self, vm: int) -> int:
        return vm // VMS_PER_USER

    def node_of(self, vm: int) -> int:
        return vm * self.nodes // self.vms


# --- The viewers ----------------------------------------------------------------------------------


@dataclass
class _Console:
    slot: ConsoleSlot
    opened: bool = False
    output_bytes: int = 0
    sent: int = 0
    answered: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    waiting: dict[bytes, float] = field(default_factory=dict)  # token -> when its command was sent
    line: bytearray = field(default_factory=bytearray)
    close: str = ""  # why the server closed it, if it did
    connection: WSConnection | None = None
    writer: asyncio.StreamWriter | None = None

    def take_output(self, data: bytes) -> None:
        """Count output; time the answers (a line ``ok <token>``) of the commands waiting."""
        self.output_bytes += len(data)
        self.line += data
        *complete, rest = self.line.split(b"\n")
        self.line = bytearray(rest)
        for line in complete:
            token = bytes(line.strip().removeprefix(b"ok "))
            sent = self.waiting.pop(token, None) if line.startswith(b"ok ") else None
            if sent is not None:
                self.answered += 1
                self.latencies_ms.append((time.monotonic() - sent) * 1000)

    def send(self, data: bytes) -> None:
        assert self.connection is not None and self.writer is not None
        self.writer.write(self.connection.send(BytesMessage(data=data)))


def _percentile(values: list[float], share: float) -> float | None:
    ordered = sorted(values)
    return round(ordered[int(share * (len(ordered) - 1))], 1) if ordered else None


@dataclass
class ConsoleReport:
    consoles: int
    opened: int
    vms: int
    sent: int  # commands typed while the load ran, all consoles
    answered: int  # of them, answered on the console that typed them
    complete: int  # open consoles whose every command was answered
    output_bytes: int  # console output received, all consoles
    min_output_bytes: int
    latency_median_ms: float | None  # from typing a command to its answer, all answers
    latency_p95_ms: float | None
    latency_max_ms: float | None
    server_rss_mb: float
    server_cpu_percent: float
    # The bench process beside it (the clients, the consoles' nodes and guests; the streams' publisher):
    # on a small machine it takes CPU from the servers too.
    bench_cpu_percent: float
    per_console: list[dict[str, Any]]


class ConsoleLoad:
    """N console WebSockets (``slots``) held from one asyncio loop; tickets asked of the API at ``api``."""

    def __init__(self, *, api: str, slots: list[ConsoleSlot]) -> None:
        self.api = api
        self.slots = slots
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.consoles: list[_Console] = []
        self.readers: list[asyncio.Task[None]] = []
        self.typers: list[asyncio.Task[None]] = []
        self.opened = 0

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def open(self) -> None:
        """Open every console; back once each is connected to its VM (or failed)."""
        self.consoles = [_Console(slot) for slot in self.slots]
        self.opened = self._run(self._open())

    async def _open(self) -> int:
        async with httpx.AsyncClient(timeout=30) as api:
            ready = [asyncio.get_running_loop().create_future() for _ in self.consoles]
            self.readers = [
                asyncio.create_task(self._hold(api, console, ready[index]))
                for index, console in enumerate(self.consoles)
            ]
            results = await asyncio.wait_for(asyncio.gather(*ready), timeout=OPEN_TIMEOUT_SECONDS)
        return sum(1 for ok in results if ok)

    async def _hold(self, api: httpx.AsyncClient, console: _Console, ready: asyncio.Future[bool]) -> None:
        """Ask for a ticket, open the WebSocket, then read it until it ends."""
        try:
            answer = await api.post(
                f"{self.api}/api/v1/vms/{console.slot.vm_id}/console/",
                headers={"Authorization": f"Token {console.slot.token}"},
            )
            if answer.status_code != 201:
                console.close = f"ticket: {answer.status_code} {answer.text[:200]}"
                return
            url = urlsplit(answer.json()["url"])
            reader, writer = await asyncio.open_connection(url.hostname, url.port, limit=READ_SIZE)
            connection = WSConnection(ConnectionType.CLIENT)
            console.connection, console.writer = connection, writer
            writer.write(connection.send(Request(host=url.netloc, target=f"{url.path}?{url.query}")))
            text = ""
            while data := await reader.read(READ_SIZE):
                connection.receive_data(data)
                for event in connection.events():
                    if isinstance(event, RejectConnection):
                        console.close = f"handshake refused: {event.status_code}"
                        return
                    if isinstance(event, BytesMessage):
                        console.take_output(bytes(event.data))
                    elif isinstance(event, TextMessage):
                        text += event.data
                        if event.message_finished:
                            status = json.loads(text)
                            text = ""
                            if status.get("event") == "connected" and not ready.done():
                                console.opened = True
                                ready.set_result(True)
                    elif isinstance(event, CloseConnection):
                        console.close = console.close or f"{event.code} {event.reason}"
                        if connection.state is ConnectionState.REMOTE_CLOSING:  # not an answer to ours
                            writer.write(connection.send(event.response()))
                        return
                    elif isinstance(event, AcceptConnection):
                        continue
        except (OSError, httpx.HTTPError) as exc:
            console.close = console.close or f"{type(exc).__name__}: {exc}"
        finally:
            if not ready.done():
                ready.set_result(False)
            if console.writer is not None:
                console.writer.close()

    @contextlib.contextmanager
    def typing(self) -> Iterator[None]:
        """Type a command on each open console every ``TYPE_SECONDS`` while the block runs; after it,
        wait (up to ``ANSWER_WAIT_SECONDS``) for the answers of the last ones."""
        self._run(self._start_typing())
        try:
            yield
        finally:
            self._run(self._stop_typing())

    async def _start_typing(self) -> None:
        self.typers = [
            asyncio.create_task(self._type(index, console))
            for index, console in enumerate(self.consoles)
            if console.opened
        ]

    async def _type(self, index: int, console: _Console) -> None:
        await asyncio.sleep(random.uniform(0, TYPE_SECONDS))  # the consoles type out of step
        while True:
            token = f"{index}-{console.sent}".encode()
            console.waiting[token] = time.monotonic()
            console.sent += 1
            if console.writer is not None and not console.writer.is_closing():  # else: unanswered
                console.send(b"echo ok " + token + b"\r")
            await asyncio.sleep(TYPE_SECONDS)

    async def _stop_typing(self) -> None:
        for task in self.typers:
            task.cancel()
        await asyncio.gather(*self.typers, return_exceptions=True)
        deadline = time.monotonic() + ANSWER_WAIT_SECONDS
        while any(console.waiting for console in self.consoles) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)

    def report(self, *, rss_mb: float, cpu_percent: float, bench_cpu_percent: float) -> ConsoleReport:
        latencies = [latency for console in self.consoles for latency in console.latencies_ms]
        return ConsoleReport(
            consoles=len(self.consoles),
            opened=self.opened,
            vms=len({slot.vm_id for slot in self.slots}),
            sent=sum(console.sent for console in self.consoles),
            answered=sum(console.answered for console in self.consoles),
            complete=sum(1 for c in self.consoles if c.opened and c.sent and c.answered == c.sent),
            output_bytes=sum(console.output_bytes for console in self.consoles),
            min_output_bytes=min((console.output_bytes for console in self.consoles), default=0),
            latency_median_ms=round(statistics.median(latencies), 1) if latencies else None,
            latency_p95_ms=_percentile(latencies, 0.95),
            latency_max_ms=round(max(latencies), 1) if latencies else None,
            server_rss_mb=round(rss_mb, 1),
            server_cpu_percent=round(cpu_percent, 1),
            bench_cpu_percent=round(bench_cpu_percent, 1),
            per_console=[
                {
                    "vm": console.slot.vm_id,
                    "opened": console.opened,
                    "output_bytes": console.output_bytes,
                    "answered": console.answered,
                    "sent": console.sent,
                    "median_ms": round(statistics.median(console.latencies_ms), 1)
                    if console.latencies_ms
                    else None,
                    "p95_ms": _percentile(console.latencies_ms, 0.95),
                    "closed": console.close,
                }
                for console in self.consoles
            ],
        )

    def close(self) -> None:
        self._run(self._close())

    async def _close(self) -> None:
        """Close each WebSocket as a client does (a close frame), then stop reading it."""
        for console in self.consoles:
            if console.opened and console.connection is not None and console.writer is not None:
                with contextlib.suppress(Exception):
                    console.writer.write(console.connection.send(CloseConnection(code=1000)))
        if self.readers:
            _, pending = await asyncio.wait(self.readers, timeout=5)  # the server's close frame
            for task in pending:
                task.cancel()
        await asyncio.gather(*self.readers, return_exceptions=True)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
