"""A cluster whose node workers live in their own network namespaces ("hosts" on one underlay), with a
client namespace on node 1's provider LAN, for tests of VM networks with real guests.

Node 1 maps the physical network ``lan`` to ``lan0``, the veth to the client. The node workers reach
a private Redis on the underlay's root address (the control worker and the test too); DWCP and VXLAN
cross the underlay between the namespaces.
"""

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.redis_server import PrivateRedis, producer_on
from tests.netlab import NetLab, netlab
from tests.workers.node.conftest import NodeHost, cluster, guest_image, test_guest  # noqa: F401 - fixtures


@pytest.fixture
def lab() -> Iterator[NetLab]:
    with netlab(2) as lab:
        lab.add_client(lab.hosts[0], "client", "lan0")
        yield lab


@pytest.fixture
def cluster_hosts(lab: NetLab) -> tuple[NodeHost, ...]:
    first, second = lab.hosts
    return (
        NodeHost(first.netns, first.address, ("--physical-networks", "lan=lan0")),
        NodeHost(second.netns, second.address),
    )


@pytest.fixture
def cluster_redis_url(lab: NetLab, tmp_path: Path, settings) -> Iterator[str]:
    server = PrivateRedis(tmp_path, host=lab.gateway)
    server.start()
    settings.REDIS_URL = server.url
    try:
        with producer_on(server.url):
            yield server.url
    finally:
        server.stop()
