"""Console tests: the streams server (``tests.streams_server``), the real cluster of node workers
(``tests.workers.node.conftest``) and a WebSocket viewer that keeps what it was sent."""

import json
import re
import struct
import time
from typing import Any

import pytest
import websocket

from tests.streams_server import launch_streams
from tests.workers.node.conftest import (
    cluster,
    cluster_extra_env,
    cluster_hosts,
    cluster_redis_url,
    guest_image,
    test_guest,
)

__all__ = [
    "cluster",
    "cluster_extra_env",
    "cluster_hosts",
    "cluster_redis_url",
    "guest_image",
    "launch_streams",
    "test_guest",
]


def stream_url(streams: str, ticket_body: dict[str, Any]) -> str:
    """The ticket's WebSocket URL on the test's streams server (the REST answer names its host as
    the test client's, ``testserver``)."""
    path = ticket_body["url"].split("://", 1)[1].split("/", 1)[1]
    return f"{streams.replace('http://', 'ws://')}/{path}"


class Viewer:
    """One WebSocket console viewer: output bytes, JSON events and the close frame, as received."""

    def __init__(self, url: str) -> None:
        self.ws = websocket.create_connection(url, timeout=30)
        self.output = bytearray()
        self.events: list[dict[str, Any]] = []
        self.close_code: int | None = None
        self.close_reason = ""

    def _read_one(self, timeout: float) -> None:
        self.ws.settimeout(timeout)
        opcode, frame = self.ws.recv_data_frame(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_BINARY:
            self.output += frame.data
        elif opcode == websocket.ABNF.OPCODE_TEXT:
            self.events.append(json.loads(frame.data))
        elif opcode == websocket.ABNF.OPCODE_CLOSE:
            data = bytes(frame.data)
            self.close_code = struct.unpack("!H", data[:2])[0] if len(data) >= 2 else 1005
            self.close_reason = data[2:].decode(errors="replace")

    def until(self, condition: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.close_code is not None:
                raise AssertionError(
                    f"no {what} within {timeout:g} s (closed {self.close_code} {self.close_reason!r}; "
                    f"events {self.events}; last output {bytes(self.output[-300:])!r})"
                )
            try:
                self._read_one(remaining)
            except websocket.WebSocketTimeoutException:
                continue

    def wait_output(self, pattern: str, timeout: float = 30, start: int = 0) -> re.Match[bytes]:
        found: list[re.Match[bytes]] = []

        def seen() -> bool:
            match = re.search(pattern.encode(), bytes(self.output[start:]))
            if match:
                found.append(match)
            return match is not None

        self.until(seen, timeout, f"output matching {pattern!r}")
        return found[0]

    def wait_event(self, name: str, timeout: float = 30, count: int = 1) -> dict[str, Any]:
        def matching() -> list[dict[str, Any]]:
            return [event for event in self.events if event.get("event") == name]

        self.until(lambda: len(matching()) >= count, timeout, f"{count} {name!r} event(s)")
        return matching()[count - 1]

    def wait_closed(self, timeout: float = 30) -> tuple[int, str]:
        deadline = time.monotonic() + timeout
        while self.close_code is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"not closed within {timeout:g} s; events {self.events}")
            try:
                self._read_one(remaining)
            except websocket.WebSocketConnectionClosedException:
                raise AssertionError(f"closed without a close frame; events {self.events}") from None
            except websocket.WebSocketTimeoutException:
                continue
        return self.close_code, self.close_reason

    def type(self, text: str) -> None:
        self.ws.send_binary(text.encode())

    def close(self) -> None:
        self.ws.close()


@pytest.fixture
def viewers() -> Any:
    """Open viewers (``viewers.open(url)``), all closed after the test."""

    class Viewers(list[Viewer]):
        def open(self, url: str) -> Viewer:
            viewer = Viewer(url)
            self.append(viewer)
            return viewer

    opened = Viewers()
    yield opened
    for viewer in opened:
        viewer.close()
