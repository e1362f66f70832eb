"""The control side's link to a VM's serial console on its node, through DWCP, across live migrations.

:class:`ConsoleLink` finds the VM's node (:func:`locate`: the database, for one short read in Django's
thread, its connection back to the pool at once), signs a DWCP ``console`` ticket for that node
(``contract.CONSOLE_TICKET_TTL_SECONDS``), opens the DWCP tunnel (DWCP's own threads: none of
Django's sync pool) to a private unix socket and pumps bytes with asyncio. The node's console
multiplexer (``workers.node.console``) sends the scrollback first, then live output.

When the node closes the console (its QEMU quit: the VM moved to another node, stopped, or was
deleted) the viewer is told ``reconnecting``; the VM is looked up again every ``POLL_SECONDS`` while
it is still migrating on the node it left (up to ``RELOCATE_SECONDS``), and the link goes on at its
node (``connected`` again) or ends: 4404 when the VM was deleted, 1000 when it no longer runs, 1011
when its node cannot be reached after ``CONNECT_ATTEMPTS``. Input typed while reconnecting is dropped.
Used by the streams service's WebSocket (``apps.streams.console``) and by ``manage.py console``.
"""

import asyncio
import contextlib
import functools
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, NotRequired, TypedDict

from django.conf import settings

from apps.streams.access import briefly
from apps.vms.choices import VMState
from apps.vms.models import VM
from workers import contract
from workers.dwcp import DWCPError, Tunnel, open_tunnel, sign_ticket

logger = logging.getLogger(__name__)

CLOSE_NORMAL: Final = 1000
CLOSE_UNREACHABLE: Final = 1011
CLOSE_GONE: Final = 4404

READ_SIZE: Final = 64 * 1024
# How long the node may take to accept the console ticket (TCP, DWCP handshake, OPEN).
OPEN_TIMEOUT_SECONDS: Final = 15.0
# Attempts to reach the VM's node before the link gives up (1011), RETRY_SECONDS apart.
CONNECT_ATTEMPTS: Final = 3
RETRY_SECONDS: Final = 1.0
# A console that ends sooner than this after opening counts as a failed attempt (no reconnect loop).
SHORT_SESSION_SECONDS: Final = 1.0
# While the VM is still migrating on the node that closed its console: how often to look again and
# for how long (the control side records the switch within seconds of the source's QEMU quitting).
POLL_SECONDS: Final = 0.5
RELOCATE_SECONDS: Final = 120.0
# A tunnel still running this long after its viewer left is torn down (its threads).
CLEANUP_SECONDS: Final = 5.0

OPEN_STATES: Final = (VMState.RUNNING, VMState.MIGRATING)
GONE_STATES: Final = (VMState.DELETING, VMState.DELETED)


@dataclass(frozen=True)
class Location:
    """Where a VM's console is served: its node and that node's DWCP listener."""

    node: str
    dwcp_address: str
    migrating: bool


@dataclass(frozen=True)
class Ending:
    """Why a console ended: a WebSocket close code and a reason for the viewer."""

    code: int
    reason: str


def locate_now(vm_id: str) -> Location | Ending:
    """Where VM ``vm_id`` runs now (a database read), or why it has no console."""
    vm = VM.objects.select_related("node").filter(pk=vm_id).first()
    if vm is None or vm.state in GONE_STATES:
        return Ending(CLOSE_GONE, "the VM was deleted")
    if vm.state not in OPEN_STATES or vm.node is None:
        return Ending(CLOSE_NORMAL, f"the VM is {vm.state}: it has no console until it runs again")
    return Location(vm.node.name, vm.node.dwcp_address, migrating=vm.state == VMState.MIGRATING)


async def locate(vm_id: str) -> Location | Ending:
    return await briefly(locate_now, vm_id)  # an open console holds no database connection


class ConnectFailed(Exception):
    """The node could not be reached or refused the console ticket."""


_cleanups: set[asyncio.Task[None]] = set()


@functools.cache
def _socket_dir() -> Path:
    """This process's private directory (mode 0700) for the tunnels' local sockets."""
    return Path(tempfile.mkdtemp(prefix="novacron-console-"))


def _local_path() -> Path:
    return _socket_dir() / f"{uuid.uuid4().hex[:16]}.sock"


async def _retire(tunnel: Tunnel) -> None:
    """Let a tunnel whose local end was closed finish by itself; tear it down if it does not."""
    deadline = time.monotonic() + CLEANUP_SECONDS
    while not tunnel.ended and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    if not tunnel.ended:
        await asyncio.to_thread(tunnel.close)


def retire(tunnel: Tunnel) -> None:
    task = asyncio.get_running_loop().create_task(_retire(tunnel))
    _cleanups.add(task)
    task.add_done_callback(_cleanups.discard)


async def open_console(
    vm_id: str, where: Location
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Tunnel]:
    """A byte stream to VM ``vm_id``'s console on ``where``'s node; :class:`ConnectFailed` if refused."""
    ticket = sign_ticket(
        secret=settings.DWCP_SECRET,
        source_node=contract.CONSOLE_SOURCE_NODE,
        dest_node=where.node,
        kind="console",
        target=vm_id,
        ttl_seconds=contract.CONSOLE_TICKET_TTL_SECONDS,
    )
    path = _local_path()
    try:
        tunnel = open_tunnel(
            address=where.dwcp_address,
            local_path=path,
            ticket=ticket,
            secret=settings.DWCP_SECRET,
            source_node=contract.CONSOLE_SOURCE_NODE,
            streams=1,
            codec="raw",  # a few bytes at a time: nothing to gain from a codec
        )
    except (DWCPError, OSError) as exc:
        raise ConnectFailed(str(exc)) from exc
    try:
        reader, writer = await asyncio.open_unix_connection(os.fspath(path), limit=READ_SIZE)
    except OSError as exc:
        retire(tunnel)
        raise ConnectFailed(str(exc)) from exc
    deadline = time.monotonic() + OPEN_TIMEOUT_SECONDS
    while not tunnel.accepted:
        if tunnel.ended or time.monotonic() > deadline:
            writer.close()
            try:
                tunnel.wait(0)
                why = "the node closed the console at once"
            except TimeoutError:
                why = f"no answer within {OPEN_TIMEOUT_SECONDS:g} s"
            except DWCPError as exc:
                why = str(exc)
            retire(tunnel)
            raise ConnectFailed(why)
        await asyncio.sleep(0.01)
    return reader, writer, tunnel


Output = Callable[[bytes], Awaitable[None]]


class ConsoleEvent(TypedDict):
    """A status event for the viewer (the WebSocket's text messages, docs/console.md)."""

    event: Literal["connected", "reconnecting", "closed"]
    node: NotRequired[str]  # connected: the node serving the console now
    reason: NotRequired[str]  # reconnecting, closed: why, for a person


Event = Callable[[ConsoleEvent], Awaitable[None]]


class ConsoleLink:
    """One viewer's console of one VM, from node to node: ``run()`` until it returns why it ended
    (cancel it to leave); ``send()`` what the viewer types."""

    def __init__(self, vm_id: str, *, output: Output, event: Event) -> None:
        self.vm_id = vm_id
        self._output = output
        self._event = event
        self._writer: asyncio.StreamWriter | None = None

    async def send(self, data: bytes) -> None:
        """To the guest (dropped while reconnecting)."""
        writer = self._writer
        if writer is not None and not writer.is_closing():
            with contextlib.suppress(ConnectionError):  # the node just closed it: run() reconnects
                writer.write(data)
                await writer.drain()

    async def run(self) -> Ending:
        found = await locate(self.vm_id)
        failures = 0
        while True:
            if isinstance(found, Ending):
                return found
            where = found
            try:
                reader, writer, tunnel = await open_console(self.vm_id, where)
            except ConnectFailed as exc:
                logger.warning("console of VM %s: node %s: %s", self.vm_id, where.node, exc)
                failures += 1
                if failures >= CONNECT_ATTEMPTS:
                    return Ending(CLOSE_UNREACHABLE, f"node {where.node} did not open the console: {exc}")
                await asyncio.sleep(RETRY_SECONDS)
                found = await locate(self.vm_id)
                continue
            opened = time.monotonic()
            self._writer = writer
            try:
                await self._event({"event": "connected", "node": where.node})
                while chunk := await reader.read(READ_SIZE):
                    await self._output(chunk)
            finally:
                self._writer = None
                writer.close()
                retire(tunnel)
            failures = failures + 1 if time.monotonic() - opened < SHORT_SESSION_SECONDS else 0
            if failures >= CONNECT_ATTEMPTS:
                return Ending(CLOSE_UNREACHABLE, f"node {where.node} keeps closing the console")
            await self._event(
                {
                    "event": "reconnecting",
                    "reason": f"the console on node {where.node} closed (the VM may be moving); reconnecting",
                }
            )
            found = await self._relocate(where.node)

    async def _relocate(self, left: str) -> Location | Ending:
        """The VM's next location once it no longer migrates away from ``left``, or why it ended."""
        deadline = time.monotonic() + RELOCATE_SECONDS
        while True:
            found = await locate(self.vm_id)
            if isinstance(found, Ending) or found.node != left or not found.migrating:
                return found
            if time.monotonic() > deadline:
                return Ending(CLOSE_UNREACHABLE, f"the VM is still migrating from node {left}")
            await asyncio.sleep(POLL_SECONDS)


async def drain_cleanups() -> None:
    """Wait for the tunnels being retired (a command exiting)."""
    with contextlib.suppress(Exception):
        await asyncio.gather(*_cleanups)
