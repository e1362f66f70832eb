"""The streams service as it runs, for tests: granian ``--interface asgi`` on ``novacron.asgi`` in its
own process against the test database and Redis (the ``launch_streams`` fixture), and an SSE reader."""

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import redis
from django.conf import settings
from django.db import connection

ROOT = Path(__file__).resolve().parents[1]
ORIGIN = "http://page.test:8000"  # the page allowed to open streams with credentials (CORS)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_ready(base: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> None:
    """Until the server answers ``/healthz`` (or fails: its log in the error)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"streams server exited: {log.read_text()}")
        try:
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError(f"the streams server at {base} did not answer: {log.read_text()}")


@pytest.fixture(scope="session")
def launch_streams(
    django_db_setup: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., str]]:
    """Start (once per set of settings) a streams server on a free port; its base URL."""
    servers: dict[tuple[tuple[str, str], ...], tuple[str, subprocess.Popen[bytes]]] = {}
    pids: dict[str, int] = {}
    database = connection.settings_dict

    def launch(**overrides: str) -> str:
        key = tuple(sorted(overrides.items()))
        if key in servers:
            return servers[key][0]
        port = _free_port()
        application = overrides.pop("APPLICATION_NAME", f"streams-{port}")  # pg_stat_activity shows it
        url = f"postgres://{database['USER']}@{database['HOST']}:{database['PORT']}/{database['NAME']}"
        env = os.environ | {
            "DJANGO_SETTINGS_MODULE": "novacron.settings.test",
            "DATABASE_URL": f"{url}?application_name={application}",
            "REDIS_URL": settings.REDIS_URL,
            "STREAMS_ALLOWED_ORIGINS": ORIGIN,
            "STREAMS_KEEPALIVE_SECONDS": "1",
            "DB_POOL_MIN": "1",
            "DB_POOL_MAX": "2",
            **overrides,
        }
        command = [
            str(Path(sys.executable).parent / "granian"),
            "--interface",
            "asgi",
            "novacron.asgi:application",
        ]
        command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1", "--log-level", "warning"]
        log = tmp_path_factory.mktemp("streams") / "server.log"
        with log.open("wb") as output:
            process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
        servers[key] = (f"http://127.0.0.1:{port}", process)
        _wait_ready(servers[key][0], process, log)
        pids[servers[key][0]] = process.pid
        return servers[key][0]

    launch.pids = pids  # type: ignore[attr-defined]
    yield launch
    for _, process in servers.values():
        workers = psutil.Process(process.pid).children(recursive=True)
        process.terminate()
        process.wait(timeout=10)
        psutil.wait_procs(workers, timeout=10)  # their pools' connections go before the test database


@dataclass
class Event:
    name: str
    data: Any
    id: str | None


@dataclass
class Reader:
    """The events of one open SSE response, comments (keepalives) and ``retry:`` kept apart."""

    response: httpx.Response
    lines: AsyncIterator[str] = field(init=False)
    comments: list[str] = field(default_factory=list)
    retry: int | None = None

    def __post_init__(self) -> None:
        self.lines = self.response.aiter_lines()

    async def next(self, timeout: float = 10) -> Event | None:
        """The next event (None: the stream ended)."""
        return await asyncio.wait_for(self._next(), timeout)

    async def _next(self) -> Event | None:
        fields: dict[str, str] = {}
        async for line in self.lines:
            if line.startswith(":"):
                self.comments.append(line[1:].strip())
            elif line.startswith("retry:"):
                self.retry = int(line[6:])
            elif line:
                name, _, value = line.partition(":")
                fields[name] = value.removeprefix(" ")
            elif "event" in fields:
                return Event(fields["event"], json.loads(fields["data"]), fields.get("id"))
        return None


def server_redis_connections(launch: Callable[..., str], base: str) -> tuple[int, int]:
    """The Redis connections of the streams server at ``base`` (its process tree): all, and those
    subscribed to channels (CLIENT LIST matched to the server's own sockets)."""
    server = psutil.Process(launch.pids[base])  # type: ignore[attr-defined]
    ports = {
        f"{conn.laddr.ip}:{conn.laddr.port}"
        for process in [server, *server.children(recursive=True)]
        for conn in process.net_connections(kind="tcp")
        if conn.raddr
        and conn.raddr.port
        == redis.Redis.from_url(settings.REDIS_URL).connection_pool.connection_kwargs.get("port", 6379)
    }
    mine = [
        client for client in redis.Redis.from_url(settings.REDIS_URL).client_list() if client["addr"] in ports
    ]
    return len(mine), sum(1 for client in mine if int(client.get("sub", 0)) > 0)
