"""Kernel devices of one node's networks: bridges, VXLAN devices, taps, and the overlay's fdb entries.

Each ``ensure_*`` brings a device to the described configuration whatever it found (missing, half
made by an interrupted task, configured differently), so running it twice changes nothing. Bridges
skip the host's bridge-netfilter hooks (``nf_call_iptables 0``): their frames are filtered by the
node's bridge-family table only, and the inet table sees routed packets only.
"""

from pathlib import Path
from typing import Any

from .commands import json_of, run
from .model import Network, Nic

Links = dict[str, dict[str, Any]]
ZERO_MAC = "00:00:00:00:00:00"  # the fdb entry a VXLAN device floods unknown and broadcast frames to


def links() -> Links:
    """Every link of this namespace, by name, with its details (``ip -d link``)."""
    return {link["ifname"]: link for link in json_of("ip", "-d", "-j", "link", "show")}


def kind(link: dict[str, Any]) -> str:
    return str(link.get("linkinfo", {}).get("info_kind", ""))


def ensure_bridge(name: str, network: Network, existing: Links) -> None:
    link = existing.get(name)
    if link is not None and kind(link) != "bridge":
        delete(name, link)
        link = None
    if link is None:
        run(
            "ip", "link", "add", name, "address", network.gateway_mac, "mtu", str(network.mtu),
            "type", "bridge", "stp_state", "0", "forward_delay", "0", "mcast_snooping", "0",
            "nf_call_iptables", "0", "nf_call_ip6tables", "0", "nf_call_arptables", "0",
        )  # fmt: skip
    _no_ipv6(name)
    run("ip", "link", "set", name, "address", network.gateway_mac, "mtu", str(network.mtu), "up")
    address = f"{network.gateway}/{network.cidr.prefixlen}"
    stale = [
        f"{info['local']}/{info['prefixlen']}"
        for entry in json_of("ip", "-j", "-4", "addr", "show", "dev", name)
        for info in entry.get("addr_info", [])
        if f"{info['local']}/{info['prefixlen']}" != address
    ]
    for other in stale:
        run("ip", "addr", "del", other, "dev", name)
    run("ip", "addr", "replace", address, "dev", name)


def ensure_vxlan(
    name: str, network: Network, *, bridge: str, local: str, port: int, learning: bool, existing: Links
) -> None:
    """The network's VXLAN device, a port of its bridge. ``learning``: remote MACs are learned from
    arriving packets; else every frame not for a local port is sent to every peer (head-end
    replication), the only correct choice when a peer listens on another port than this node's (the
    kernel gives a learned entry the device's own destination port)."""
    link = existing.get(name)
    if link is not None:
        info = link.get("linkinfo", {}).get("info_data", {})
        wanted = (network.vni, local, port)
        if kind(link) != "vxlan" or (info.get("id"), info.get("local"), info.get("port")) != wanted:
            delete(name, link)
            link = None
    if link is None:
        run(
            "ip", "link", "add", name, "mtu", str(network.mtu), "type", "vxlan", "id", str(network.vni),
            "local", local, "dstport", str(port), "learning" if learning else "nolearning", "ttl", "64",
        )  # fmt: skip
    elif bool(link.get("linkinfo", {}).get("info_data", {}).get("learning")) != learning:
        run("ip", "link", "set", name, "type", "vxlan", "learning" if learning else "nolearning")
        if not learning:  # what it learned would send to the wrong port
            for entry in json_of("bridge", "-j", "fdb", "show", "dev", name):
                if (
                    entry.get("mac") != ZERO_MAC
                    and "dst" in entry
                    and "permanent" not in entry.get("state", "")
                ):
                    run("bridge", "fdb", "del", entry["mac"], "dev", name, "dst", entry["dst"], check=False)
    _no_ipv6(name)
    run("ip", "link", "set", name, "master", bridge, "mtu", str(network.mtu), "up")


def ensure_tap(nic: Nic, tag: str, existing: Links) -> None:
    """The NIC's persistent tap (QEMU opens it by name), a port of its network's bridge."""
    name = nic.tap(tag)
    if name not in existing:
        run("ip", "tuntap", "add", "dev", name, "mode", "tap")
    enslave(name, nic.network.bridge(tag), nic.network.mtu)


def enslave(port: str, bridge: str, mtu: int) -> None:
    """Make ``port`` (a tap, or an operator's interface) a port of ``bridge``, up, at ``mtu``."""
    _no_ipv6(port)
    run("ip", "link", "set", port, "master", bridge, "mtu", str(mtu), "up")


def release(port: str) -> None:
    """Take an operator's interface out of a bridge (it stays up, as the operator left it)."""
    run("ip", "link", "set", port, "nomaster", check=False)


def delete(name: str, link: dict[str, Any]) -> None:
    if kind(link) == "tun":
        # Clears persistence: a QEMU still holding the tap keeps it until it exits.
        run("ip", "tuntap", "del", "dev", name, "mode", "tap", check=False)
    else:
        run("ip", "link", "del", name, check=False)


def set_flood_peers(vxlan: str, peers: set[tuple[str, int]], *, own_port: int) -> None:
    """Head-end replication: one all-zero fdb entry per peer node (address, VXLAN port), no others."""
    current = {
        (entry["dst"], int(entry.get("port", own_port)))  # shown only when not the device's own
        for entry in json_of("bridge", "-j", "fdb", "show", "dev", vxlan)
        if entry.get("mac") == ZERO_MAC and "dst" in entry
    }
    for address, port in current - peers:
        run("bridge", "fdb", "del", ZERO_MAC, "dev", vxlan, "dst", address, "port", str(port), check=False)
    for address, port in sorted(peers - current):
        run("bridge", "fdb", "append", ZERO_MAC, "dev", vxlan, "dst", address, "port", str(port))


def _no_ipv6(name: str) -> None:
    """Our devices carry no IPv6: nothing the node would send unasked (router solicitations) leaks."""
    knob = Path("/proc/sys/net/ipv6/conf") / name / "disable_ipv6"
    if knob.exists():
        knob.write_text("1")
