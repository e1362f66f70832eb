"""A private ``redis-server`` per fault scenario, so concurrent test sessions on the machine's shared
Redis (other engineers' clusters consume the same ``control`` queue name) cannot steal its messages,
and so a scenario may restart its Redis without touching anyone else's.
"""

import contextlib
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from novacron.celery import app as celery_app
from tests.workers.node.conftest import wait_for


class PrivateRedis:
    """A redis-server listening on ``host`` (loopback, or e.g. the underlay address of namespaced nodes)."""

    def __init__(self, workdir: Path, host: str = "127.0.0.1") -> None:
        with socket.socket() as sock:
            sock.bind((host, 0))
            self.port = int(sock.getsockname()[1])
        self.workdir = workdir
        self.host = host
        self.url = f"redis://{host}:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                self.host,
                "--protected-mode",  # no password: protected mode would refuse clients of an underlay address
                "no",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--dir",
                str(self.workdir),
            ],
            stdout=(self.workdir / "redis.log").open("ab"),
            stderr=subprocess.STDOUT,
        )
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        wait_for(lambda: _pings(client), 10, "the private redis-server")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # SHUTDOWN: the append-only file is flushed
            self.process.wait(timeout=15)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def producer_on(url: str) -> Iterator[None]:
    """Send this process's Celery tasks to ``url`` (the pools are rebuilt from ``broker_url``)."""
    previous = celery_app.conf.broker_url

    def reset(broker: str) -> None:
        celery_app.conf["broker_url"] = broker
        celery_app._pool = None  # type: ignore[attr-defined]
        with contextlib.suppress(AttributeError, KeyError):
            celery_app.__dict__["amqp"]._producer_pool = None

    reset(url)
    try:
        yield
    finally:
        reset(previous)


@pytest.fixture
def cluster_redis_url(private_redis: PrivateRedis, settings) -> Iterator[str]:
    settings.REDIS_URL = private_redis.url
    with producer_on(private_redis.url):
        yield private_redis.url
