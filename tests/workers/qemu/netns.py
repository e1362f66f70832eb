"""A private network for NIC tests: a network namespace holding a bridge with a gateway address, a
minimal dnsmasq serving static leases on it, and persistent taps in the bridge.

Everything lives inside a namespace named for this test run (pid and a random part), so tests running
at the same time never see each other's devices; deleting the namespace removes them all.
`entered` switches the calling thread into the namespace: QEMU started from it (daemonized) stays
there, and sockets created in it keep talking from it after the thread switches back.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from workers.qemu import NetworkSpec

CLONE_NEWNET = 0x40000000
BRIDGE = "br0"  # inside the private namespace: no other test can see the name
GUEST_MTU = 1400  # handed out by DHCP (option 26): below the bridge's 1500, so the guest shows it took it
_libc = ctypes.CDLL(None, use_errno=True)


def run(*command: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip()}")
    return result.stdout


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns: {os.strerror(errno)}")


@dataclass
class PrivateNetwork:
    """A namespace with a bridge on ``network`` (the bridge holds the gateway) and its DHCP server."""

    namespace: str
    network: NetworkSpec
    work_dir: Path
    leases: dict[str, str] = field(default_factory=dict)
    _dnsmasq: subprocess.Popen[bytes] | None = None

    def ns(self, *command: str) -> str:
        """Run a command inside the namespace and return its output."""
        return run("ip", "netns", "exec", self.namespace, *command)

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """The calling thread in the namespace for the duration of the block."""
        with open("/proc/thread-self/ns/net") as home, open(f"/run/netns/{self.namespace}") as target:
            _setns(target.fileno())
            try:
                yield
            finally:
                _setns(home.fileno())

    def add_tap(self, name: str) -> None:
        """A persistent tap in the bridge, as the node creates one before QEMU starts."""
        run("ip", "-n", self.namespace, "tuntap", "add", "dev", name, "mode", "tap")
        run("ip", "-n", self.namespace, "link", "set", name, "master", BRIDGE, "up")

    def remove_tap(self, name: str) -> None:
        run("ip", "-n", self.namespace, "link", "del", name)

    def serve_dhcp(self, leases: dict[str, str]) -> None:
        """(Re)start dnsmasq with static leases MAC -> IPv4 only, router, DNS and MTU options."""
        self.stop_dhcp()
        self.leases = dict(leases)
        subnet = self.network.subnet
        command = [
            "ip", "netns", "exec", self.namespace, "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null",
            "--port=0", "--bind-interfaces", f"--interface={BRIDGE}", "--except-interface=lo",
            f"--dhcp-range={subnet.network_address},static,{subnet.netmask},1h",
            f"--dhcp-option=option:router,{self.network.gateway}",
            f"--dhcp-option=option:dns-server,{self.network.gateway}",
            f"--dhcp-option=option:mtu,{GUEST_MTU}",
            f"--dhcp-leasefile={self.work_dir / 'dnsmasq.leases'}",
            f"--pid-file={self.work_dir / 'dnsmasq.pid'}",
            *(f"--dhcp-host={mac},{address}" for mac, address in leases.items()),
        ]  # fmt: skip
        self._dnsmasq = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop_dhcp(self) -> None:
        if self._dnsmasq is not None:
            self._dnsmasq.terminate()
            self._dnsmasq.wait(timeout=10)
            self._dnsmasq = None


@contextlib.contextmanager
def private_network() -> Iterator[PrivateNetwork]:
    """A fresh namespace with a bridge on a random 10.2xx.y.0/24 (gateway .1), removed afterwards."""
    namespace = f"ncq-nic-{os.getpid()}-{random.randrange(16**6):06x}"
    second, third = random.randrange(200, 250), random.randrange(256)
    network = NetworkSpec(
        id="test", name="test", vni=random.randrange(1, 2**24), cidr=f"10.{second}.{third}.0/24",
        gateway=f"10.{second}.{third}.1", dns=(f"10.{second}.{third}.1",), mtu=GUEST_MTU,
    )  # fmt: skip
    run("ip", "netns", "add", namespace)
    work_dir = Path(tempfile.mkdtemp(prefix="ncq-nic-", dir="/tmp"))
    private = PrivateNetwork(namespace, network, work_dir)
    try:
        private.ns("ip", "link", "set", "lo", "up")
        private.ns("ip", "link", "add", BRIDGE, "type", "bridge")
        private.ns("ip", "addr", "add", f"{network.gateway}/{network.subnet.prefixlen}", "dev", BRIDGE)
        private.ns("ip", "link", "set", BRIDGE, "up")
        yield private
    finally:
        private.stop_dhcp()
        subprocess.run(["ip", "netns", "del", namespace], check=False)
        subprocess.run(["rm", "-rf", str(work_dir)], check=False)
