"""A cluster whose node workers live in their own network namespaces ("hosts" on one underlay), with a
client namespace on a provider LAN that both nodes join, for tests of VM networks with real guests.

Both nodes map the physical network ``lan`` to ``lan0``, their veth into the client's LAN bridge
(the client's address goes on its bridge ``lan``). The node workers reach
a private Redis on the underlay's root address (the control worker and the test too); DWCP and VXLAN
cross the underlay between the namespaces.
"""

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.redis_server import PrivateRedis, producer_on
from tests.netlab import NetLab, netlab
from tests.workers.node.conftest import (  # noqa: F401 - fixtures
    NodeHost,
    cluster,
    cluster_extra_env,
    guest_image,
    test_guest,
)


@pytest.fixture
def lab() -> Iterator[NetLab]:
    with netlab(2) as lab:
        lab.add_lan(lab.hosts, "client", "lan0")
        yield lab


@pytest.fixture
def cluster_hosts(lab: NetLab) -> tuple[NodeHost, ...]:
    return tuple(
        NodeHost(host.netns, host.address, ("--physical-networks", "lan=lan0")) for host in lab.hosts
    )


@pytest.fixture
def cluster_redis_url(lab: NetLab, tmp_path: Path, settings) -> Iterator[str]:
    server = PrivateRedis(tmp_path, host=lab.gateway)
    try:
        server.start()
        settings.REDIS_URL = server.url
        with producer_on(server.url):
            yield server.url
    finally:
        server.stop()
