"""Server-Sent Events for the streams service: the wire format, CORS, and a consumer base that ends
when the client goes away.

A long-lived response runs inside ``handle`` (Channels dispatches one message at a time), so
:class:`EventStreamConsumer` watches the ASGI ``receive`` itself for ``http.disconnect`` while it
waits. CORS: only the exact origins of ``STREAMS_ALLOWED_ORIGINS`` get credentials, never ``*``.
"""

import asyncio
import contextlib
import json
from collections.abc import Awaitable
from typing import Any, Final, TypeVar

from channels.generic.http import AsyncHttpConsumer
from django.conf import settings

from .access import Refused

T = TypeVar("T")
RETRY_MS: Final = 2000  # how long an EventSource waits before it reconnects


def event(name: str, data: Any, *, event_id: str | None = None) -> bytes:
    """One event: its name, optional id (EventSource sends it back as Last-Event-ID), JSON data."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {name}\ndata: {json.dumps(data, default=str)}\n\n".encode()


def comment(text: str) -> bytes:
    return f": {text}\n\n".encode()


def retry(milliseconds: int = RETRY_MS) -> bytes:
    return f"retry: {milliseconds}\n\n".encode()


class ClientGone(Exception):
    """The client closed the connection."""


def header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


def cors_headers(scope: dict[str, Any]) -> list[tuple[bytes, bytes]]:
    """Credentialed CORS for an allowed page's origin (``Vary: Origin`` always)."""
    found = [(b"vary", b"Origin")]
    origin = header(scope, b"origin")
    if origin is not None and origin in settings.STREAMS_ALLOWED_ORIGINS:
        found += [
            (b"access-control-allow-origin", origin.encode("latin-1")),
            (b"access-control-allow-credentials", b"true"),
        ]
    return found


class NotFoundConsumer(AsyncHttpConsumer):
    """Any other path: 404, as JSON."""

    async def handle(self, body: bytes) -> None:
        await self.send_response(
            404,
            json.dumps({"detail": "Not found."}).encode(),
            headers=[(b"content-type", b"application/json")],
        )


class HealthConsumer(AsyncHttpConsumer):
    """``/healthz``: the process serves (for a proxy's or an orchestrator's checks)."""

    async def handle(self, body: bytes) -> None:
        await self.send_response(200, b"ok", headers=[(b"content-type", b"text/plain")])


class EventStreamConsumer(AsyncHttpConsumer):
    """An SSE endpoint: ``stream`` sends events until it returns; errors become JSON answers."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self._receive = receive  # read by the disconnect watcher while ``handle`` runs
        await super().__call__(scope, receive, send)

    async def handle(self, body: bytes) -> None:
        cors = cors_headers(self.scope)
        if self.scope["method"] == "OPTIONS":  # a preflight (a script sending Authorization)
            await self.send_response(
                204,
                b"",
                headers=[
                    *cors,
                    (b"access-control-allow-methods", b"GET, OPTIONS"),
                    (b"access-control-allow-headers", b"Authorization, X-Project, Last-Event-ID"),
                    (b"access-control-max-age", b"600"),
                ],
            )
            return
        if self.scope["method"] != "GET":
            await self.refuse(Refused(405, f'Method "{self.scope["method"]}" not allowed.'), cors)
            return
        self._gone = asyncio.get_running_loop().create_future()
        self._started = False
        watcher = asyncio.create_task(self._watch_disconnect())
        try:
            await self.stream(cors)
        except Refused as refused:
            if self._started:  # refused on a re-check (a revoked token): the stream just ends
                await self.finish()
            else:
                await self.refuse(refused, cors)
        except ClientGone:
            pass
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def stream(self, cors: list[tuple[bytes, bytes]]) -> None:
        raise NotImplementedError

    async def refuse(self, refused: Refused, cors: list[tuple[bytes, bytes]]) -> None:
        headers = [*cors, (b"content-type", b"application/json")]
        if refused.status == 429:
            headers.append((b"retry-after", b"10"))
        await self.send_response(
            refused.status, json.dumps({"detail": refused.detail}).encode(), headers=headers
        )

    async def start(self, cors: list[tuple[bytes, bytes]]) -> None:
        headers = [
            *cors,
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),  # nginx: pass each event on at once
        ]
        await self.send_headers(status=200, headers=headers)
        self._started = True
        await self.write(retry())

    async def write(self, data: bytes) -> None:
        if self._gone.done():
            raise ClientGone
        try:
            await self.send_body(data, more_body=True)
        except OSError as exc:  # the server reports a closed connection
            raise ClientGone from exc

    async def finish(self) -> None:
        if not self._gone.done():
            with contextlib.suppress(OSError):
                await self.send_body(b"", more_body=False)

    async def until_gone(self, waiting: Awaitable[T], timeout: float) -> T | None:
        """``waiting``'s result, or None after ``timeout`` seconds; :class:`ClientGone` first if the
        client leaves."""
        task = asyncio.ensure_future(waiting)
        try:
            done, _ = await asyncio.wait(
                {task, self._gone}, timeout=max(timeout, 0), return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            if not task.done():
                task.cancel()
        if task in done:
            return task.result()
        if self._gone.done():
            raise ClientGone
        return None

    async def _watch_disconnect(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self._gone.set_result(None)
                return
