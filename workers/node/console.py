"""The serial consoles of this node's VMs, for any number of viewers at once, reached through DWCP.

QEMU's console socket (``console.sock``) takes one client at a time, so each VM being watched has one
:class:`ConsoleMux`: it is QEMU's client, keeps the last ``CONSOLE_SCROLLBACK_BYTES`` of output
(seeded from the tail of ``serial.log``, where QEMU logs all the guest prints), sends that
scrollback to each new viewer and then the live output, and writes what any viewer types to the
guest. A viewer is one end of a socket pair; the DWCP server carries the other end to the control
plane as a tunnel of a ``console`` ticket (``ConsoleManager.attach`` is the server's provider), so
nothing reaches a console without the control plane's signature.

One thread per watched VM, non-blocking sockets and ``poll``. Invariants: output goes at the pace
of the fastest viewer; a viewer that stops reading is dropped once ``VIEWER_BACKLOG_BYTES`` wait for
it, and never slows the others; input
waiting for the guest is bounded (viewers are not read while ``GUEST_BACKLOG_BYTES`` wait); when
QEMU closes the socket (the VM stopped, or moved to another node) every viewer is closed (it sees
EOF); when the last viewer leaves the mux lets QEMU's socket go, so a VM nobody watches holds
nothing and its socket is free for another client. Output between two muxes is not lost for the
next viewer: QEMU logs it to ``serial.log``, which seeds the next scrollback.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import threading
from collections.abc import Callable

from workers import contract
from workers.dwcp import TransferError
from workers.qemu.layout import NodeLayout, VmPaths, canonical_uuid

logger = logging.getLogger(__name__)

# QEMU's output is read while some viewer has less than this waiting: the console goes at the pace
# of its fastest viewer, and a guest printing faster than that is held back by its UART.
OUTPUT_PAUSE_BYTES = 4 * contract.CONSOLE_SCROLLBACK_BYTES
# Output waiting for one viewer (its tunnel not keeping up) before that viewer is dropped: 16 times
# the scrollback, far more than a terminal shows, small next to what a stuck viewer would cost.
VIEWER_BACKLOG_BYTES = 16 * contract.CONSOLE_SCROLLBACK_BYTES
# Input waiting for the guest (a UART takes it slowly): viewers are not read beyond this, so TCP
# pushes back on whoever pastes too much.
GUEST_BACKLOG_BYTES = 64 * 1024
READ_SIZE = 64 * 1024
# QEMU queues a client while another holds its console; a full queue must not block the DWCP server.
CONNECT_TIMEOUT_SECONDS = 5.0
POLL_READ = select.POLLIN | select.POLLPRI
POLL_GONE = select.POLLHUP | select.POLLERR | select.POLLNVAL


class ConsoleMux:
    """QEMU's one client for a VM's console, shared by its viewers (see the module docstring)."""

    def __init__(
        self, paths: VmPaths, first_viewer: socket.socket, on_closed: Callable[[ConsoleMux], None]
    ) -> None:
        self.uuid = paths.run_dir.name
        self._on_closed = on_closed
        qemu = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        qemu.settimeout(CONNECT_TIMEOUT_SECONDS)
        try:
            qemu.connect(str(paths.console_socket))
        except OSError:
            qemu.close()
            raise
        qemu.setblocking(False)
        self._qemu = qemu
        # Read after connecting: output in between may show twice, never go missing.
        try:
            with paths.serial_log.open("rb") as log:
                log.seek(0, 2)
                size = log.tell()
                log.seek(max(0, size - contract.CONSOLE_SCROLLBACK_BYTES))
                self._scrollback = bytearray(log.read())
        except OSError:
            self._scrollback = bytearray()
        self._viewers: dict[socket.socket, bytearray] = {}
        self._to_guest = bytearray()
        self._arrivals: list[socket.socket] = [first_viewer]
        self._lock = threading.Lock()
        self._closed = False
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._thread = threading.Thread(target=self._run, name=f"console-{self.uuid[:8]}", daemon=True)
        self._thread.start()

    def add(self, viewer: socket.socket) -> bool:
        """Take one more viewer; False when this mux is closing (make a new one)."""
        with self._lock:
            if self._closed:
                return False
            self._arrivals.append(viewer)
        with contextlib.suppress(OSError):
            self._wake_writer.send(b"\0")
        return True

    def close(self) -> None:
        """Close every viewer and QEMU's socket (the node worker stopping)."""
        with self._lock:
            self._closed = True
        with contextlib.suppress(OSError):
            self._wake_writer.send(b"\0")
        self._thread.join(timeout=5)

    # -- the loop ----------------------------------------------------------------------------------

    def _admit(self) -> None:
        with self._lock:
            arrivals, self._arrivals = self._arrivals, []
        for viewer in arrivals:
            viewer.setblocking(False)
            self._viewers[viewer] = bytearray(self._scrollback)

    def _drop(self, viewer: socket.socket) -> None:
        self._viewers.pop(viewer, None)
        with contextlib.suppress(OSError):
            viewer.shutdown(socket.SHUT_RDWR)
        viewer.close()

    def _run(self) -> None:
        reason = "its last viewer left"
        try:
            reason = self._loop()
        except Exception:
            logger.exception("console of VM %s failed", self.uuid)
            reason = "an error"
        finally:
            with self._lock:
                self._closed = True
                arrivals, self._arrivals = self._arrivals, []
            for viewer in [*self._viewers, *arrivals]:
                self._drop(viewer)
            self._qemu.close()
            self._wake_reader.close()
            self._wake_writer.close()
            self._on_closed(self)
            logger.info("console of VM %s closed: %s", self.uuid, reason)

    def _loop(self) -> str:
        while True:
            self._admit()
            with self._lock:
                if self._closed:
                    return "the node worker is stopping"
            if not self._viewers:
                return "its last viewer left"
            poller = select.poll()
            poller.register(self._wake_reader, POLL_READ)
            take_output = min(len(pending) for pending in self._viewers.values()) < OUTPUT_PAUSE_BYTES
            poller.register(
                self._qemu, (POLL_READ if take_output else 0) | (select.POLLOUT if self._to_guest else 0)
            )
            take_input = len(self._to_guest) < GUEST_BACKLOG_BYTES
            by_fd = {viewer.fileno(): viewer for viewer in self._viewers}
            for fd, viewer in by_fd.items():
                poller.register(
                    fd, (POLL_READ if take_input else 0) | (select.POLLOUT if self._viewers[viewer] else 0)
                )
            for fd, events in poller.poll():
                if fd == self._wake_reader.fileno():
                    with contextlib.suppress(BlockingIOError):
                        self._wake_reader.recv(4096)
                elif fd == self._qemu.fileno():
                    ended = self._serve_qemu(events)
                    if ended:
                        return ended
                elif fd in by_fd and by_fd[fd] in self._viewers:
                    self._serve_viewer(by_fd[fd], events)

    def _serve_qemu(self, events: int) -> str | None:
        """Output to every viewer, input to the guest; why the console ended, or None."""
        if events & POLL_READ or events & POLL_GONE:
            try:
                output = self._qemu.recv(READ_SIZE)
            except BlockingIOError:
                output = None
            except OSError as exc:
                return f"QEMU's console socket failed: {exc}"
            if output == b"":
                return "QEMU closed the console (the VM stopped or moved)"
            if output:
                self._scrollback += output
                del self._scrollback[: -contract.CONSOLE_SCROLLBACK_BYTES]
                for viewer, pending in list(self._viewers.items()):
                    pending.extend(output)
                    if len(pending) > VIEWER_BACKLOG_BYTES:
                        logger.warning(
                            "console of VM %s: a viewer fell %d bytes behind, dropped",
                            self.uuid,
                            len(pending),
                        )
                        self._drop(viewer)
        if events & select.POLLOUT and self._to_guest:
            try:
                sent = self._qemu.send(self._to_guest)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                return f"QEMU's console socket failed: {exc}"
            del self._to_guest[:sent]
        return None

    def _serve_viewer(self, viewer: socket.socket, events: int) -> None:
        pending = self._viewers[viewer]
        try:
            if events & select.POLLOUT and pending:
                sent = viewer.send(pending)
                del pending[:sent]
            if events & (POLL_READ | POLL_GONE):
                data = viewer.recv(READ_SIZE)
                if not data:
                    self._drop(viewer)  # the viewer left (its tunnel ended)
                    return
                self._to_guest += data
        except BlockingIOError:
            return
        except OSError:
            self._drop(viewer)


class ConsoleManager:
    """The node's consoles, one :class:`ConsoleMux` per watched VM: the DWCP server's provider of
    ``console`` tickets (``attach``)."""

    def __init__(self, layout: NodeLayout) -> None:
        self._layout = layout
        self._muxes: dict[str, ConsoleMux] = {}
        self._lock = threading.Lock()

    def attach(self, vm_uuid: str) -> socket.socket:
        """A socket joined to the console of VM ``vm_uuid`` as one more viewer: the scrollback first,
        then the live output; what is written to it goes to the guest. ``TransferError`` (code
        ``no_console``) when the VM runs no console here."""
        canonical = canonical_uuid(vm_uuid)
        if canonical is None:
            raise TransferError(f"{vm_uuid!r} is not a VM uuid", code="no_console")
        ours, theirs = socket.socketpair()
        with self._lock:
            mux = self._muxes.get(canonical)
            if mux is None or not mux.add(ours):
                try:
                    mux = ConsoleMux(self._layout.vm(canonical), ours, self._forget)
                except OSError as exc:
                    ours.close()
                    theirs.close()
                    raise TransferError(
                        f"VM {canonical} has no running console here ({exc.strerror or exc})",
                        code="no_console",
                    ) from None
                self._muxes[canonical] = mux
        return theirs

    def _forget(self, mux: ConsoleMux) -> None:
        with self._lock:
            if self._muxes.get(mux.uuid) is mux:
                del self._muxes[mux.uuid]

    def stop(self) -> None:
        with self._lock:
            muxes = list(self._muxes.values())
        for mux in muxes:
            mux.close()
