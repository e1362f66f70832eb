"""A synchronous QMP client for Celery tasks, on top of the asyncio `qemu.qmp.QMPClient`.

One `EventLoopThread` (a daemon thread running an asyncio loop) serves any number of `QmpSession`s;
callers block on futures with a timeout. Each session pumps QEMU's events into a bounded buffer as
they arrive, so an event that fires between two calls is not lost: take `event_mark()` before acting,
then `wait_event(..., after=mark)`.

Every failure surfaces as a `QmpError` subclass: a command QEMU refused (`QmpCommandError` with the
QMP error class and description), a timeout, a socket that cannot be connected, or a reply that is not
valid QMP (`QmpProtocolError`). QEMU serves one QMP client per monitor at a time, so a session left
connected by another process shows up as a greeting timeout, and the message says so.

The loop thread does not survive ``fork()``: create the driver in the process that uses it.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import ConnectError, ExecInterruptedError, ExecuteError, QMPClient, QMPError, Runstate

from workers.qemu.errors import QmpCommandError, QmpConnectError, QmpError, QmpProtocolError, QmpTimeout

T = TypeVar("T")

DEFAULT_QMP_TIMEOUT = 10.0
EVENT_BUFFER_SIZE = 2048  # plenty for a migration's worth of events; old ones fall off the front
DISCONNECT_TIMEOUT = 5.0


class EventLoopThread:
    """An asyncio loop on a daemon thread; `run` executes a coroutine there and waits for it."""

    def __init__(self, name: str = "novacron-qmp") -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float, what: str) -> T:
        """Run ``coroutine`` on the loop; raise `QmpTimeout` naming ``what`` after ``timeout`` seconds."""
        if self._loop.is_closed():
            coroutine.close()
            raise QmpError(f"cannot {what}: the QMP event loop has been closed")
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError as exc:
            future.cancel()
            raise QmpTimeout(f"QEMU did not answer within {timeout:g} s to: {what}") from exc

    def close(self) -> None:
        """Cancel what still runs on the loop, stop it and join its thread (idempotent).

        Tasks left pending (the event pump of a session never closed, the QMP library's reader and
        writer) would otherwise be destroyed by the garbage collector at some later moment.
        """
        if self._loop.is_closed():
            return
        with contextlib.suppress(QmpError):
            self.run(_cancel_all_tasks(), DISCONNECT_TIMEOUT, "cancel the QMP loop's tasks")
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=DISCONNECT_TIMEOUT)
        self._loop.close()


@dataclass(frozen=True)
class QmpEvent:
    """One QMP event as received; ``seq`` orders events within a session (1, 2, ...)."""

    seq: int
    name: str
    data: Mapping[str, Any] = field(default_factory=dict)
    timestamp: float = 0.0  # QEMU's host wall-clock time of the event, in seconds


class QmpSession:
    """A QMP connection to one QEMU's unix socket, with a synchronous API."""

    def __init__(
        self, socket_path: Path, loop: EventLoopThread, *, timeout: float = DEFAULT_QMP_TIMEOUT
    ) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self._loop = loop
        self._client: QMPClient | None = None
        self._pump: asyncio.Task[None] | None = None
        self._events: collections.deque[QmpEvent] = collections.deque(maxlen=EVENT_BUFFER_SIZE)
        self._next_seq = 1
        self._events_changed = threading.Condition()
        self._lock = threading.Lock()

    @property
    def connected(self) -> bool:
        """True while the QMP session is up (it drops when QEMU exits)."""
        return self._client is not None and self._client.runstate == Runstate.RUNNING

    def connect(self) -> None:
        """Connect and negotiate capabilities unless already connected; reconnect a dropped session."""
        with self._lock:
            if self.connected:
                return
            self._loop.run(self._reset(), self.timeout, f"close the old QMP session on {self.socket_path}")
            self._loop.run(self._connect(), self.timeout + 1, f"connect QMP on {self.socket_path}")

    def close(self) -> None:
        """Disconnect (idempotent); buffered events stay readable."""
        with self._lock:
            self._loop.run(self._reset(), self.timeout, f"close the QMP session on {self.socket_path}")

    def execute(
        self, command: str, arguments: Mapping[str, object] | None = None, *, timeout: float | None = None
    ) -> Any:
        """Run a QMP command and return its ``return`` value; connects first if needed."""
        self.connect()
        client = self._client
        if client is None:
            raise QmpConnectError(f"no QMP session on {self.socket_path}")
        limit = self.timeout if timeout is None else timeout
        return self._loop.run(self._execute(client, command, arguments), limit, f"QMP command {command!r}")

    def event_mark(self) -> int:
        """The sequence number of the newest event received so far (0 before any)."""
        with self._events_changed:
            return self._next_seq - 1

    def events_since(self, mark: int) -> list[QmpEvent]:
        """Buffered events newer than ``mark``, oldest first."""
        with self._events_changed:
            return [event for event in self._events if event.seq > mark]

    def wait_event(
        self,
        names: str | Iterable[str],
        *,
        timeout: float,
        after: int = 0,
        match: Callable[[QmpEvent], bool] | None = None,
    ) -> QmpEvent:
        """The first event newer than ``after`` whose name is in ``names`` (and that ``match`` accepts).

        Already-buffered events count, so nothing is missed between `event_mark` and this call.
        """
        wanted = {names} if isinstance(names, str) else set(names)
        deadline = time.monotonic() + timeout
        with self._events_changed:
            while True:
                for event in self._events:
                    if event.seq > after and event.name in wanted and (match is None or match(event)):
                        return event
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise QmpTimeout(
                        f"no {'/'.join(sorted(wanted))} event from {self.socket_path} within {timeout:g} s"
                    )
                self._events_changed.wait(remaining)

    async def _connect(self) -> None:
        client = QMPClient(str(self.socket_path))
        try:
            await asyncio.wait_for(client.connect(str(self.socket_path)), self.timeout)
        except TimeoutError as exc:
            await _quietly_disconnect(client)
            raise QmpConnectError(
                f"QEMU at {self.socket_path} accepted the connection but sent no QMP greeting within "
                f"{self.timeout:g} s; another client probably holds its monitor (QEMU serves one at a time)"
            ) from exc
        except ConnectError as exc:
            await _quietly_disconnect(client)
            raise QmpConnectError(f"cannot connect QMP on {self.socket_path}: {exc.exc or exc}") from exc
        except QMPError as exc:
            await _quietly_disconnect(client)
            raise QmpProtocolError(f"QMP handshake with {self.socket_path} failed: {exc}") from exc
        self._client = client
        self._pump = asyncio.get_running_loop().create_task(self._pump_events(client))

    async def _reset(self) -> None:
        if self._pump is not None:
            pump, self._pump = self._pump, None
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)  # finished, whatever ended it
        if self._client is not None:
            client, self._client = self._client, None
            await _quietly_disconnect(client)

    async def _pump_events(self, client: QMPClient) -> None:
        async for message in client.events:
            name = message.get("event")
            data = message.get("data") or {}
            stamp = message.get("timestamp")
            seconds = (
                float(stamp.get("seconds", 0)) + float(stamp.get("microseconds", 0)) / 1e6
                if isinstance(stamp, Mapping)
                else 0.0
            )
            with self._events_changed:
                self._events.append(
                    QmpEvent(
                        seq=self._next_seq,
                        name=str(name),
                        data=data if isinstance(data, Mapping) else {"value": data},
                        timestamp=seconds,
                    )
                )
                self._next_seq += 1
                self._events_changed.notify_all()

    async def _execute(self, client: QMPClient, command: str, arguments: Mapping[str, object] | None) -> Any:
        try:
            return await client.execute(command, dict(arguments) if arguments else None)
        except ExecuteError as exc:
            raise QmpCommandError(command, exc.error_class, str(exc)) from exc
        except ExecInterruptedError as exc:
            raise QmpProtocolError(
                f"the QMP session on {self.socket_path} closed before QEMU answered {command!r} "
                "(QEMU exited or the connection broke)"
            ) from exc
        except QMPError as exc:
            raise QmpProtocolError(f"QMP command {command!r} on {self.socket_path} failed: {exc}") from exc


async def _cancel_all_tasks() -> None:
    """Cancel every other task of the running loop and wait until each has finished."""
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _quietly_disconnect(client: QMPClient) -> None:
    # disconnect() re-raises whatever ended the session (EOFError when QEMU exited, a protocol
    # error after a malformed reply); the session is being discarded, so that is not news.
    with contextlib.suppress(QMPError, OSError, EOFError, TimeoutError):
        await asyncio.wait_for(client.disconnect(), DISCONNECT_TIMEOUT)
