"""Nodes and stand-in guests in network namespaces for the data plane's tests.

A :class:`Node` is a host namespace of a :class:`~tests.netlab.NetLab` whose data plane is driven
through ``python -m workers.net`` run inside it. A :class:`Guest` is a namespace whose ``eth0`` is one
end of a veth; the other end sits in the node's namespace under the NIC's tap name, so the data plane
enrolls it exactly as it enrolls a QEMU tap (bridge port, rules, lease).
"""

import json
import os
import secrets
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.netlab import Namespace, NetLab, netlab
from workers import contract
from workers.net import names

pytestmark = [pytest.mark.netns]


def network(
    vni: int, third_octet: int, *, external: bool = False, physical: str = ""
) -> contract.NetworkDescription:
    return {
        "id": f"net-{vni}",
        "name": f"net{vni}",
        "vni": vni,
        "cidr": f"172.31.{third_octet}.0/24",
        "gateway": f"172.31.{third_octet}.1",
        "dns": [f"172.31.{third_octet}.53"],
        "mtu": 1400,
        "external": external,
        "physical_network": physical,
    }


@dataclass
class Node:
    host: Namespace
    state_dir: Path
    port: int
    tag: str = field(default_factory=lambda: secrets.token_hex(2))
    physical_networks: str = ""

    def call(self, command: str, request: dict[str, Any], *, check: bool = True) -> str:
        result = self.host.run(
            sys.executable, "-m", "workers.net", "--tag", self.tag, "--address", self.host.address,
            "--port", str(self.port), "--state-dir", str(self.state_dir),
            "--physical-networks", self.physical_networks, command,
            input=json.dumps(request), check=False, cwd=Path(__file__).resolve().parents[3],
        )  # fmt: skip
        if check and result.returncode != 0:
            raise AssertionError(f"workers.net {command} failed: {result.stderr}")
        return result.stderr

    def attach(self, vm: str, nics: list[contract.NicDescription]) -> None:
        self.call("attach", {"vm": vm, "nics": nics})

    def detach(self, vm: str) -> None:
        self.call("detach", {"vm": vm})

    def peers(self, peers: dict[str, list[contract.OverlayPeer]], *, complete: bool = True) -> None:
        self.call("peers", {"peers": peers, "complete": complete})

    def overlay_peer(self) -> contract.OverlayPeer:
        return {"address": self.host.address, "port": self.port}

    def own_links(self) -> set[str]:
        return {name for name in self.host.links() if names.is_own(self.tag, name)}

    def snapshot(self) -> tuple[str, str, str]:
        """What an operator sees: own devices, the overlay's fdb, this node's rules."""
        links = json.dumps(
            sorted(
                (
                    name,
                    link.get("master", ""),
                    link["mtu"],
                    link.get("linkinfo", {}).get("info_data", {}).get("id"),
                )
                for name, link in self.host.links().items()
                if names.is_own(self.tag, name)
            )
        )
        fdb = self.host.run("bridge", "fdb", "show").stdout
        rules = "".join(
            self.host.run("nft", "list", "table", family, f"novacron_{self.tag}", check=False).stdout
            for family in ("bridge", "inet")
        )
        return links, "\n".join(sorted(line for line in fdb.splitlines() if f"x{self.tag}" in line)), rules


@dataclass
class Guest:
    namespace: Namespace
    node: Node
    vm: str
    nic: contract.NicDescription

    @property
    def ipv4(self) -> str:
        return self.nic["ipv4"]

    def run(self, *command: str, check: bool = True, timeout: float = 60) -> str:
        return self.namespace.run(*command, check=check, timeout=timeout).stdout

    def dhcp(self, lab_dir: Path) -> dict[str, str]:
        """Ask for a lease with busybox udhcpc; what the server offered (empty: no answer)."""
        out = lab_dir / f"lease-{self.namespace.netns}"
        script = lab_dir / "udhcpc.script"
        script.write_text(
            f'#!/bin/sh\n[ "$1" = bound ] && env > "{out}.$$" && mv "{out}.$$" "{out}"\nexit 0\n'
        )
        script.chmod(0o755)
        out.unlink(missing_ok=True)
        self.namespace.run(
            "busybox", "udhcpc", "-i", "eth0", "-f", "-q", "-n", "-t", "4", "-T", "1", "-O", "mtu",
            "-s", str(script), check=False, timeout=30,
        )  # fmt: skip
        if not out.exists():
            return {}
        return dict(line.split("=", 1) for line in out.read_text().splitlines() if "=" in line)

    def configure(self) -> None:
        """The address and default route DHCP gives, set by hand (tests that are not about DHCP)."""
        network = self.nic["network"]
        prefix = network["cidr"].split("/")[1]
        self.run("ip", "addr", "replace", f"{self.ipv4}/{prefix}", "dev", "eth0")
        self.run("ip", "route", "replace", "default", "via", network["gateway"])

    def pings(self, address: str, count: int = 2) -> bool:
        return (
            self.namespace.run(
                "ping", "-c", str(count), "-W", "1", "-i", "0.2", address, check=False
            ).returncode
            == 0
        )


class Lab:
    """A netlab of nodes with data planes, and guests on them."""

    def __init__(self, lab: NetLab, workdir: Path) -> None:
        self.netlab = lab
        self.workdir = workdir
        port = 4800 + secrets.randbelow(1000) * 4  # one port on every host, as in production
        self.nodes = [Node(host=host, state_dir=workdir / host.name, port=port) for host in lab.hosts]

    def guest(self, node: Node, nic: contract.NicDescription, *, index: int = 0, vm: str = "") -> Guest:
        """A guest namespace wired like NIC ``index`` of VM ``vm`` on ``node`` (attached at once)."""
        vm = vm or str(uuid.uuid4())
        namespace = self.netlab.add_namespace("guest")
        tap = names.tap_name(node.tag, vm, index)
        node.host.run(
            "ip", "link", "add", tap, "type", "veth", "peer", "name", "eth0", "netns", namespace.netns
        )
        namespace.run(
            "ip", "link", "set", "eth0", "address", nic["mac"], "mtu", str(nic["network"]["mtu"]), "up"
        )
        node.attach(vm, [nic])
        return Guest(namespace=namespace, node=node, vm=vm, nic=nic)

    def connect(self) -> None:
        """Every node is every other node's peer on every VNI any node hosts."""
        vnis = {str(nic_vni) for node in self.nodes for nic_vni in _vnis(node)}
        for node in self.nodes:
            node.peers(
                {vni: [other.overlay_peer() for other in self.nodes if other is not node] for vni in vnis}
            )


def _vnis(node: Node) -> set[int]:
    vms = node.state_dir / "vms"
    return {nic["network"]["vni"] for path in vms.glob("*.json") for nic in json.loads(path.read_text())}


def mac() -> str:
    return "52:54:00:" + ":".join(f"{byte:02x}" for byte in secrets.token_bytes(3))


def nic(net: contract.NetworkDescription, host: int) -> contract.NicDescription:
    return {"mac": mac(), "ipv4": net["cidr"].rsplit(".", 1)[0] + f".{host}", "network": net}


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    with netlab(hosts=3) as built:
        lab = Lab(built, tmp_path)
        try:
            yield lab
        finally:
            for node in lab.nodes:  # stops the dnsmasqs (the lab kills whatever is left)
                node.call("reconcile", {"vms": {}}, check=False)
