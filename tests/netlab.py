"""Hosts in network namespaces, for tests that need traffic to really cross machines.

A :class:`NetLab` holds an underlay: a bridge in the root namespace with an address (where a test's
private Redis can listen, see ``tests/faults/redis_server.py``) and ``N`` host namespaces, each with a
veth into that bridge (``eth0`` inside) and its own address on the underlay's /24. A client namespace
hangs off one host by a veth whose host end carries a chosen name (``lan0``: start the node worker
there with ``--physical-networks lan=lan0``), or holds a LAN bridge that several hosts join that way
(:meth:`NetLab.add_lan`; the client's address then goes on its bridge ``lan``). Every name has a random suffix, since several test
sessions share the machine; :meth:`NetLab.close` kills what still runs in its namespaces and removes
them and the bridge. Needs root.
"""

import contextlib
import ipaddress
import json
import os
import secrets
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.migration.netns import remove_namespace

IFNAMSIZ = 15


def ip(*arguments: str) -> None:
    subprocess.run(["ip", *arguments], check=True, capture_output=True, text=True)


@dataclass
class Namespace:
    """A network namespace and how to run things in it."""

    name: str  # the test's own name for it ("node1", "client")
    netns: str  # the namespace's name (``ip netns``)
    address: str = ""  # its underlay address (hosts), or "" (clients until a test gives them one)

    def command(self, *command: str) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *command]

    def run(
        self, *command: str, check: bool = True, timeout: float = 60, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run ``command`` in this namespace; its output as text."""
        return subprocess.run(
            self.command(*command), check=check, capture_output=True, text=True, timeout=timeout, **kwargs
        )

    def popen(self, command: Sequence[str], **kwargs: Any) -> "subprocess.Popen[bytes]":
        return subprocess.Popen(self.command(*command), **kwargs)

    def links(self) -> dict[str, dict[str, Any]]:
        output = self.run("ip", "-d", "-j", "link", "show").stdout
        return {link["ifname"]: link for link in json.loads(output)}


@dataclass
class NetLab:
    hosts: list[Namespace] = field(default_factory=list)
    clients: list[Namespace] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.suffix = f"{os.getpid() % 0x10000:04x}{secrets.token_hex(2)}"
        self.bridge = f"nlb{self.suffix}"
        self.subnet = _free_subnet()
        self.gateway = str(self.subnet.network_address + 1)  # the root namespace's address
        ip("link", "add", self.bridge, "type", "bridge", "nf_call_iptables", "0", "nf_call_arptables", "0")
        ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        self._namespaces: list[Namespace] = []

    def add_host(self, name: str) -> Namespace:
        """A host namespace with ``eth0`` on the underlay; its address is ``.11``, ``.12``, ..."""
        address = str(self.subnet.network_address + 11 + len(self.hosts))
        host = self._namespace(name)
        outside = f"nl{self.suffix}h{len(self.hosts)}"
        ip("link", "add", outside, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
        ip("link", "set", outside, "master", self.bridge, "up")
        host.run("ip", "addr", "add", f"{address}/24", "dev", "eth0")
        host.run("ip", "link", "set", "eth0", "up")
        host.address = address
        self.hosts.append(host)
        return host

    def add_client(self, host: Namespace, name: str = "client", interface: str = "lan0") -> Namespace:
        """A namespace joined to ``host`` by a veth: ``interface`` in ``host``, ``eth0`` in the client
        (both up, no address)."""
        client = self._namespace(name)
        _join(host, interface, client, "eth0")
        self.clients.append(client)
        return client

    def add_lan(self, hosts: Sequence[Namespace], name: str = "client", interface: str = "lan0") -> Namespace:
        """A client namespace holding a LAN (a bridge ``lan``, where the client's address goes) that
        every one of ``hosts`` joins by a veth named ``interface`` there (up, no address): a provider
        network's LAN reaching several nodes."""
        client = self._namespace(name)
        client.run("ip", "link", "add", "lan", "type", "bridge")
        client.run("ip", "link", "set", "lan", "up")
        for index, host in enumerate(hosts):
            _join(host, interface, client, f"port{index}")
            client.run("ip", "link", "set", f"port{index}", "master", "lan")
        self.clients.append(client)
        return client

    def add_namespace(self, name: str) -> Namespace:
        """A bare namespace (loopback up) that the lab removes at close; join it yourself."""
        return self._namespace(name)

    def close(self) -> None:
        for namespace in reversed(self._namespaces):
            remove_namespace(namespace.netns)
        subprocess.run(["ip", "link", "del", self.bridge], check=False, capture_output=True)

    def _namespace(self, name: str) -> Namespace:
        netns = f"nl{self.suffix}-{name}-{len(self._namespaces)}"
        ip("netns", "add", netns)
        namespace = Namespace(name=name, netns=netns)
        self._namespaces.append(namespace)
        namespace.run("ip", "link", "set", "lo", "up")
        return namespace


@contextlib.contextmanager
def netlab(hosts: int = 2) -> Iterator[NetLab]:
    """A lab with ``hosts`` host namespaces (``node1``, ``node2``, ...), removed on exit."""
    lab = NetLab()
    try:
        for index in range(hosts):
            lab.add_host(f"node{index + 1}")
        yield lab
    finally:
        lab.close()


def _join(host: Namespace, host_end: str, client: Namespace, client_end: str) -> None:
    """A veth between two namespaces, both ends up (no address)."""
    ip(
        "link",
        "add",
        host_end,
        "netns",
        host.netns,
        "type",
        "veth",
        "peer",
        "name",
        client_end,
        "netns",
        client.netns,
    )
    host.run("ip", "link", "set", host_end, "up")
    client.run("ip", "link", "set", client_end, "up")


def _free_subnet() -> ipaddress.IPv4Network:
    """A random 10.2xx.y.0/24 that no address of the root namespace is in."""
    used = [
        ipaddress.IPv4Interface(f"{info['local']}/{info['prefixlen']}").network
        for link in json.loads(
            subprocess.run(["ip", "-j", "-4", "addr"], capture_output=True, text=True).stdout
        )
        for info in link.get("addr_info", [])
    ]
    for _ in range(100):
        subnet = ipaddress.IPv4Network(f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(256)}.0/24")
        if not any(subnet.overlaps(network) for network in used):
            return subnet
    raise RuntimeError("no free 10.2xx.y.0/24 for the underlay")
