"""DHCP for a node's guests: one ``dnsmasq`` per (node, network), bound to the network's bridge.

It hands out static leases only, and only for the MACs of this node's own NICs on that network
(``dhcp-ignore=tag:!known``): a guest elsewhere on the overlay never gets an answer from this node
(its broadcasts do not cross the VXLAN device anyway, see ``workers.net.firewall``). DNS is off
(``port=0``). Its files live in ``<state>/dhcp/<vni>/``; the hosts file is rewritten and dnsmasq
reloaded (SIGHUP) when NICs come or go, restarted when the network's options change.
"""

import contextlib
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path

from .commands import run
from .model import Network, NetworkError, Nic

LEASE_TIME = "1h"  # guests renew within it, with whichever node then hosts them
STOP_TIMEOUT = 5.0


class DhcpServer:
    """The dnsmasq of one network on this node, found again through its pid file after a restart."""

    def __init__(self, root: Path, vni: int) -> None:
        self.dir = root / str(vni)
        self.conf = self.dir / "dnsmasq.conf"
        self.hosts = self.dir / "hosts"
        self.pidfile = self.dir / "dnsmasq.pid"

    def ensure(self, network: Network, bridge: str, nics: Sequence[Nic]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        conf = self._config(network, bridge)
        hosts = "".join(f"{nic.mac},{nic.ipv4}\n" for nic in sorted(nics, key=lambda nic: nic.mac))
        pid = self.pid()
        conf_changed = _replace(self.conf, conf)
        hosts_changed = _replace(self.hosts, hosts)
        if pid is not None and conf_changed:
            self.stop()
            pid = None
        if pid is None:
            run("dnsmasq", f"--conf-file={self.conf}")  # returns once it serves (or failed to)
        elif hosts_changed:
            os.kill(pid, signal.SIGHUP)  # re-reads dhcp-hostsfile

    def stop(self) -> None:
        pid = self.pid()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while _alive(pid):
            if time.monotonic() > deadline:
                raise NetworkError(f"dnsmasq {pid} ({self.dir}) did not stop in {STOP_TIMEOUT:g} s")
            time.sleep(0.02)

    def remove(self) -> None:
        self.stop()
        for path in sorted(self.dir.glob("*")):
            path.unlink()
        with contextlib.suppress(FileNotFoundError):
            self.dir.rmdir()

    def pid(self) -> int | None:
        """The running dnsmasq of this directory (a pid file naming another process does not count)."""
        try:
            pid = int(self.pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        return pid if f"--conf-file={self.conf}".encode() in cmdline.split(b"\0") else None

    def _config(self, network: Network, bridge: str) -> str:
        options = [f"option:router,{network.gateway}", f"option:mtu,{network.mtu}"]
        if network.dns:
            options.append(f"option:dns-server,{','.join(str(server) for server in network.dns)}")
        lines = [
            "port=0",  # no DNS
            f"interface={bridge}",
            "bind-interfaces",
            "except-interface=lo",
            "no-resolv",
            "no-hosts",
            # The hosts file is re-read on SIGHUP from the node's data dir, which only root may read.
            "user=root",
            f"dhcp-range={network.cidr.network_address},static,{network.cidr.netmask},{LEASE_TIME}",
            f"dhcp-hostsfile={self.hosts}",
            "dhcp-ignore=tag:!known",
            *(f"dhcp-option={option}" for option in options),
            f"dhcp-leasefile={self.dir / 'leases'}",
            f"pid-file={self.pidfile}",
            f"log-facility={self.dir / 'dnsmasq.log'}",
            "log-dhcp",
        ]
        return "\n".join(lines) + "\n"


def servers(root: Path) -> dict[int, DhcpServer]:
    """Every network's DHCP directory under ``root``, by VNI (running or not)."""
    if not root.is_dir():
        return {}
    return {
        int(path.name): DhcpServer(root, int(path.name)) for path in root.iterdir() if path.name.isdigit()
    }


def _replace(path: Path, text: str) -> bool:
    """Write ``text`` to ``path`` atomically; whether it changed."""
    with contextlib.suppress(FileNotFoundError):
        if path.read_text() == text:
            return False
    scratch = path.with_name(f".{path.name}.tmp")
    scratch.write_text(text)
    scratch.replace(path)
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (dnsmasq is our grandchild, reaped by init; in tests by whoever) counts as gone.
    with contextlib.suppress(OSError):
        return " Z " not in Path(f"/proc/{pid}/stat").read_text().split(")", 1)[1][:3]
    return False
