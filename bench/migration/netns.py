"""Two "hosts" on this machine for benchmarks: network namespaces joined by a shaped veth link.

    host  <-veth->  ns A (node A)  <-veth, tc tbf->  ns B (node B)  <-veth->  host
                     | lan0                              | lan0
                     +------ client ns: bridge "lan" ----+

Each namespace also has a veth to the host (for Redis, and the image store's pushes to the nodes'
DWCP servers, routed to their link addresses); the A<->B link carries all migration
traffic and the VMs' overlay (VXLAN), and is shaped with ``tc qdisc tbf`` on both ends. The client
namespace plays an operator's machine on a provider LAN that both nodes join (each bridges its
``lan0`` into the provider network); the client's address goes on its bridge ``lan``. Addresses are private ones that exist only inside these namespaces. Needs root.

:func:`cut` drops every packet between the nodes' link addresses (nftables, in A: a link that goes
silent, as a pulled cable or a firewall drop, not a reset) until :func:`mend`. Each user of this module
(the migration bench, the soak) has its own :meth:`Topology.of`, so both can run at once.
"""

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

PREFIX = "ncbm"


def sh(*command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(command), check=check, capture_output=True, text=True)


@dataclass(frozen=True)
class Topology:
    prefix: str = PREFIX  # of the namespaces' and host links' names
    ns_a: str = f"{PREFIX}a"
    ns_b: str = f"{PREFIX}b"
    ns_client: str = f"{PREFIX}c"
    host_a: str = "10.231.0.1"  # host end of the host<->A link
    a_host: str = "10.231.0.2"
    host_b: str = "10.231.0.5"
    b_host: str = "10.231.0.6"
    a_link: str = "10.231.1.1"  # A's address on the shaped A<->B link
    b_link: str = "10.231.1.2"

    @classmethod
    def of(cls, prefix: str, octet: int) -> "Topology":
        """Names starting with ``prefix`` (at most 12 characters) and addresses in ``10.<octet>.0.0/23``."""
        net = f"10.{octet}"
        return cls(
            prefix, f"{prefix}a", f"{prefix}b", f"{prefix}c",
            f"{net}.0.1", f"{net}.0.2", f"{net}.0.5", f"{net}.0.6", f"{net}.1.1", f"{net}.1.2",
        )  # fmt: skip

    def exec_prefix(self, ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]


def remove_namespace(netns: str) -> None:
    """Kill what still runs in ``netns`` (a node worker's daemons, dnsmasq and QEMU, outlive it) and
    delete it: a deleted namespace lives on, with its processes, as long as one of them does."""
    for pid in sh("ip", "netns", "pids", netns, check=False).stdout.split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    sh("ip", "netns", "del", netns, check=False)


def _cleanup(topology: Topology) -> None:
    for ns in (topology.ns_a, topology.ns_b, topology.ns_client):
        remove_namespace(ns)
    for link in (f"{topology.prefix}ha", f"{topology.prefix}hb"):
        sh("ip", "link", "del", link, check=False)


@contextlib.contextmanager
def two_hosts(topology: Topology | None = None) -> Iterator[Topology]:
    topology = topology or Topology()
    _cleanup(topology)
    try:
        a, b = topology.ns_a, topology.ns_b
        for ns in (a, b):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        # host <-> A and host <-> B
        for host_if, ns, ns_if, host_ip, ns_ip in (
            (f"{topology.prefix}ha", a, "eth-host", topology.host_a, topology.a_host),
            (f"{topology.prefix}hb", b, "eth-host", topology.host_b, topology.b_host),
        ):
            sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if, "netns", ns)
            sh("ip", "addr", "add", f"{host_ip}/30", "dev", host_if)
            sh("ip", "link", "set", host_if, "up")
            sh("ip", "-n", ns, "addr", "add", f"{ns_ip}/30", "dev", ns_if)
            sh("ip", "-n", ns, "link", "set", ns_if, "up")
        # A <-> B, the link migrations cross
        sh("ip", "-n", a, "link", "add", "eth-peer", "type", "veth", "peer", "name", "eth-peer", "netns", b)
        for ns, ip in ((a, topology.a_link), (b, topology.b_link)):
            sh("ip", "-n", ns, "addr", "add", f"{ip}/30", "dev", "eth-peer")
            sh("ip", "-n", ns, "link", "set", "eth-peer", "up")
        # The host reaches each node's address on that link through its own veth to the node: the image
        # store on the host pushes images to the nodes' DWCP servers there, off the shaped link.
        for host_if, ns_ip, link_ip in ((f"{topology.prefix}ha", topology.a_host, topology.a_link),
                                        (f"{topology.prefix}hb", topology.b_host, topology.b_link)):  # fmt: skip
            sh("ip", "route", "add", f"{link_ip}/32", "via", ns_ip, "dev", host_if)
        # the client's LAN, which both nodes join
        client = topology.ns_client
        sh("ip", "netns", "add", client)
        sh("ip", "-n", client, "link", "set", "lo", "up")
        sh("ip", "-n", client, "link", "add", "lan", "type", "bridge")
        sh("ip", "-n", client, "link", "set", "lan", "up")
        for ns, port in ((a, "port-a"), (b, "port-b")):
            sh("ip", "-n", ns, "link", "add", "lan0", "type", "veth", "peer", "name", port, "netns", client)
            sh("ip", "-n", ns, "link", "set", "lan0", "up")
            sh("ip", "-n", client, "link", "set", port, "master", "lan", "up")
        yield topology
    finally:
        _cleanup(topology)


def shape(topology: Topology, rate: str | None) -> None:
    """Limit the A<->B link to ``rate`` (e.g. "1gbit", "100mbit") in both directions; None lifts it."""
    for ns in (topology.ns_a, topology.ns_b):
        sh("ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", "eth-peer", "root", check=False)
        if rate is not None:
            burst = "1mb" if rate.endswith("gbit") else "256kb"
            sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth-peer", "root",
               "tbf", "rate", rate, "burst", burst, "latency", "50ms")  # fmt: skip


CUT_TABLE = "nccut"


def drop_peer(netns: str, peer: str) -> None:
    """In ``netns``, drop every packet to and from ``peer`` (an address), silently: a cut link."""
    rules = (
        f"table inet {CUT_TABLE} {{\n"
        f"  chain out {{ type filter hook output priority 0; ip daddr {peer} drop; }}\n"
        f"  chain in {{ type filter hook input priority 0; ip saddr {peer} drop; }}\n"
        "}\n"
    )
    subprocess.run(["ip", "netns", "exec", netns, "nft", "-f", "-"], input=rules, text=True, check=True)


def undrop_peer(netns: str) -> None:
    """Undo :func:`drop_peer` (nothing to undo is fine)."""
    sh("ip", "netns", "exec", netns, "nft", "delete", "table", "inet", CUT_TABLE, check=False)


def cut(topology: Topology) -> None:
    """Drop every packet between A's and B's link addresses, both ways, silently (no reset)."""
    drop_peer(topology.ns_a, topology.b_link)


def mend(topology: Topology) -> None:
    """Undo :func:`cut`."""
    undrop_peer(topology.ns_a)
