"""Fixtures for DWCP tests: a real server on 127.0.0.1, a private connection pool, tickets; for the
outage tests a server that keeps cut sessions 12 s and the relay (``helpers.Link``) in front of it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from workers.dwcp import DWCPServer, sign_ticket
from workers.dwcp.transport import ConnectionPool

from .helpers import DEST, SECRET, SOURCE, Link


@pytest.fixture
def root(tmp_path: Path) -> Path:
    directory = tmp_path / "root"
    directory.mkdir()
    return directory


@pytest.fixture
def server(root: Path) -> Iterator[DWCPServer]:
    with DWCPServer(listen="127.0.0.1:0", root=root, node_name=DEST, secret=SECRET) as running:
        yield running


@pytest.fixture
def pool() -> Iterator[ConnectionPool]:
    connection_pool = ConnectionPool()
    yield connection_pool
    connection_pool.close()


@pytest.fixture
def ticket() -> Callable[..., str]:
    def make(target: str, kind: str = "file", **overrides: object) -> str:
        arguments: dict[str, object] = {
            "secret": SECRET,
            "source_node": SOURCE,
            "dest_node": DEST,
            "kind": kind,
            "target": target,
        }
        arguments.update(overrides)
        return sign_ticket(**arguments)  # type: ignore[arg-type]

    return make


@pytest.fixture
def outage_server(root: Path) -> Iterator[DWCPServer]:
    with DWCPServer(
        listen="127.0.0.1:0", root=root, node_name=DEST, secret=SECRET, link_outage_seconds=12
    ) as running:
        yield running


@pytest.fixture
def link(outage_server: DWCPServer) -> Iterator[Link]:
    relay = Link(outage_server.address)
    yield relay
    relay.close()
