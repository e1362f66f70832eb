"""A node's data plane: from the NICs of the VMs it holds and the overlay's peers to kernel state.

Every operation records what is wanted (``<state>/vms/<uuid>.json``: a VM's NICs as the contract
describes them; ``<state>/peers.json``: the peers per VNI) and then converges the whole node to it:
bridges, VXLAN devices and their flood entries, taps, uplinks, nftables, dnsmasq; and it removes every
device, rule and DHCP server carrying this node's tag that nothing wants (never another node's). So
each call is idempotent, an interrupted one is finished by the next, and a restarted worker rebuilds
everything with :meth:`DataPlane.reconcile`. Calls are serialised by a lock file (tasks run in threads;
tests drive a namespace's data plane from several processes).
"""

import contextlib
import fcntl
import ipaddress
import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workers import contract

from . import devices, firewall, names
from .dhcp import DhcpServer, servers
from .model import Network, NetworkError, Nic, parse_nics

logger = logging.getLogger(__name__)

TOOLS = ("ip", "bridge", "nft", "dnsmasq")
CAP_NET_ADMIN = 12
PHYSICAL_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")

Peers = dict[int, set[tuple[str, int]]]


@dataclass(frozen=True)
class NetSettings:
    tag: str  # names.node_tag(): in every device and table name
    underlay_address: str  # this node's NODE_ADDRESS: the VXLAN devices' local address
    vxlan_port: int
    state_dir: Path  # under the node's data dir
    physical_networks: Mapping[str, str] = field(default_factory=dict)  # provider name -> interface


def parse_physical_networks(text: str) -> dict[str, str]:
    """``lan=eth1,dmz=eth2`` -> ``{"lan": "eth1", "dmz": "eth2"}`` (empty text: none)."""
    mapping: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, interface = item.partition("=")
        if not sep or not name or not interface or not set(name + interface) <= PHYSICAL_NAME_CHARS:
            raise NetworkError(f"physical networks are NAME=INTERFACE,...; {item!r} is not one")
        if len(interface) > 15:
            raise NetworkError(f"interface {interface!r} is longer than 15 characters")
        if name in mapping:
            raise NetworkError(f"physical network {name!r} is mapped twice")
        mapping[name] = interface
    return mapping


def probe(address: str) -> str:
    """Why this node cannot attach NICs, or "" when it can (reported at registration)."""
    try:
        ipaddress.IPv4Address(address)
    except ValueError:
        return f"the node address {address!r} is not an IPv4 address (the overlay's underlay needs one)"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"missing tools: {', '.join(missing)} (install iproute2, nftables and dnsmasq-base)"
    if not Path("/dev/net/tun").exists():
        return "no /dev/net/tun: taps cannot be created"
    try:
        status = Path("/proc/self/status").read_text()
        effective = int(
            next(line.split()[1] for line in status.splitlines() if line.startswith("CapEff:")), 16
        )
    except (OSError, StopIteration, ValueError) as exc:
        return f"cannot read this process's capabilities: {exc}"
    if not effective >> CAP_NET_ADMIN & 1:
        return "the node worker lacks CAP_NET_ADMIN (run it as root or grant the capability)"
    return ""


class DataPlane:
    def __init__(self, settings: NetSettings, *, problem: str = "") -> None:
        self.settings = settings
        self.tag = settings.tag
        self.problem = problem  # from probe(): attaching NICs fails with it
        self._vms = settings.state_dir / "vms"
        self._peers = settings.state_dir / "peers.json"
        self._dhcp = settings.state_dir / "dhcp"

    # --- operations -------------------------------------------------------------------------------

    def attach(self, vm_uuid: str, nics: Sequence[contract.NicDescription]) -> None:
        """Wire a VM's NICs (taps in their bridges, rules, leases) before its QEMU starts. On failure
        the VM's previous wiring (none, for a new VM) is restored and the error raised."""
        if not nics and not self._record(vm_uuid).exists():
            return
        parsed = parse_nics(vm_uuid, nics)
        if parsed and self.problem:
            raise NetworkError(f"this node cannot attach NICs: {self.problem}")
        for nic in parsed:
            physical = nic.network.physical_network
            if physical and physical not in self.settings.physical_networks:
                raise NetworkError(
                    f"network {nic.network.name!r} is on physical network {physical!r}, which this node "
                    "does not map to an interface (--physical-networks)"
                )
        with self._locked():
            record = self._record(vm_uuid)
            previous = record.read_text() if record.exists() else None
            self._write_record(vm_uuid, list(nics))
            try:
                self._converge()
            except NetworkError:
                if previous is None:
                    record.unlink(missing_ok=True)
                else:
                    _write_atomically(record, previous)
                with contextlib.suppress(NetworkError):
                    self._converge()
                raise

    def detach(self, vm_uuid: str) -> None:
        """Remove a VM's taps (call after its QEMU is gone), and its networks if no local VM uses them."""
        with self._locked():
            record = self._record(vm_uuid)
            if not record.exists() and not self._own_taps_of(vm_uuid):
                return
            record.unlink(missing_ok=True)
            self._converge()

    def set_peers(self, peers: Mapping[str, Sequence[contract.OverlayPeer]], *, complete: bool) -> None:
        """Take the control plane's peers per VNI; ``complete``: networks not listed have none."""
        with self._locked():
            current = {} if complete else self._read_peers()
            current.update(_parse_peers(peers))
            self._write_peers(current)
            self._converge()

    def reconcile(
        self,
        vms: Mapping[str, Sequence[contract.NicDescription]],
        peers: Mapping[str, Sequence[contract.OverlayPeer]] | None = None,
    ) -> None:
        """Make the node hold exactly the NICs of ``vms`` (every VM it holds, by uuid); ``peers``
        replaces the recorded peers when given. VMs whose NICs are invalid are logged and skipped."""
        with self._locked():
            for stale in self._recorded_vms() - set(vms):
                self._record(stale).unlink(missing_ok=True)
            for vm_uuid, nics in vms.items():
                try:
                    parse_nics(vm_uuid, nics)
                except NetworkError as exc:
                    logger.error("VM %s keeps no NICs: %s", vm_uuid, exc)
                    self._record(vm_uuid).unlink(missing_ok=True)
                    continue
                if nics:
                    self._write_record(vm_uuid, list(nics))
                else:
                    self._record(vm_uuid).unlink(missing_ok=True)
            if peers is not None:
                self._write_peers(_parse_peers(peers))
            self._converge()

    def recorded(self) -> dict[str, list[contract.NicDescription]]:
        """The NICs this node wired, by VM (what survives a worker restart besides the VMs' specs)."""
        return {vm_uuid: json.loads(self._record(vm_uuid).read_text()) for vm_uuid in self._recorded_vms()}

    # --- convergence ------------------------------------------------------------------------------

    def _converge(self) -> None:
        if self.problem and not self._recorded_vms():
            return  # nothing wanted and nothing this node could have made
        nics = self._wanted_nics()
        networks = {nic.network.vni: nic.network for nic in nics}
        peers = self._read_peers()
        existing = devices.links()
        uplinks: dict[int, str] = {}
        for vni, network in sorted(networks.items()):
            bridge = network.bridge(self.tag)
            devices.ensure_bridge(bridge, network, existing)
            if network.physical_network:
                # A provider network's fabric is the LAN every node hosting its VMs is bridged to: an
                # overlay beside it would deliver each frame twice and loop through the LAN.
                uplink = self.settings.physical_networks.get(network.physical_network, "")
                if uplink not in existing:
                    raise NetworkError(
                        f"physical network {network.physical_network!r} maps to {uplink!r}, "
                        "which does not exist here"
                    )
                devices.enslave(uplink, bridge, network.mtu)
                uplinks[vni] = uplink
                continue
            own = (self.settings.underlay_address, self.settings.vxlan_port)
            network_peers = peers.get(vni, set()) - {own}
            devices.ensure_vxlan(
                network.vxlan(self.tag),
                network,
                bridge=bridge,
                local=self.settings.underlay_address,
                port=self.settings.vxlan_port,
                learning=all(port == self.settings.vxlan_port for _, port in network_peers),
                existing=existing,
            )
            devices.set_flood_peers(network.vxlan(self.tag), network_peers, own_port=self.settings.vxlan_port)
        for nic in nics:
            devices.ensure_tap(nic, self.tag, existing)
        self._remove_unwanted(nics, networks, uplinks)
        firewall.apply(self.tag, nics)
        for vni, network in networks.items():
            local = [nic for nic in nics if nic.network.vni == vni]
            DhcpServer(self._dhcp, vni).ensure(network, network.bridge(self.tag), local)

    def _remove_unwanted(
        self, nics: Sequence[Nic], networks: Mapping[int, Network], uplinks: Mapping[int, str]
    ) -> None:
        wanted = {nic.tap(self.tag) for nic in nics}
        for network in networks.values():
            wanted.add(network.bridge(self.tag))
            if not network.physical_network:
                wanted.add(network.vxlan(self.tag))
        for vni, server in servers(self._dhcp).items():
            if vni not in networks:
                server.remove()
        existing = devices.links()
        for uplink in set(self.settings.physical_networks.values()) - set(uplinks.values()):
            master = existing.get(uplink, {}).get("master", "")
            if names.is_own(self.tag, master):
                devices.release(uplink)
        # Taps first, then VXLAN devices, then the bridges they were ports of.
        for prefix in "txb":
            for name, link in existing.items():
                if name.startswith(prefix) and names.is_own(self.tag, name) and name not in wanted:
                    logger.info("removing %s, which no local VM uses", name)
                    devices.delete(name, link)

    def _wanted_nics(self) -> list[Nic]:
        recorded = self.recorded()
        # Oldest record first, so that each network keeps the description of the last attached VM
        # (the control plane's newest view).
        order = sorted(recorded, key=lambda vm: self._record(vm).stat().st_mtime_ns)
        nics = [nic for vm_uuid in order for nic in parse_nics(vm_uuid, recorded[vm_uuid])]
        newest = {nic.network.vni: nic.network for nic in nics}
        seen: dict[tuple[int, str], str] = {}
        for nic in nics:
            owner = seen.setdefault((nic.network.vni, nic.mac), nic.vm_uuid)
            if owner != nic.vm_uuid:
                raise NetworkError(
                    f"MAC {nic.mac} is on VMs {owner} and {nic.vm_uuid} of network {nic.network.name!r}"
                )
        return [Nic(nic.vm_uuid, nic.index, nic.mac, nic.ipv4, newest[nic.network.vni]) for nic in nics]

    def _own_taps_of(self, vm_uuid: str) -> list[str]:
        prefix = names.tap_name(self.tag, vm_uuid, 0)[:-1]
        return [name for name in devices.links() if name.startswith(prefix)]

    # --- records ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self._vms.mkdir(parents=True, exist_ok=True)
        with (self.settings.state_dir / "lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _record(self, vm_uuid: str) -> Path:
        return self._vms / f"{vm_uuid}.json"

    def _recorded_vms(self) -> set[str]:
        return {path.stem for path in self._vms.glob("*.json")} if self._vms.is_dir() else set()

    def _write_record(self, vm_uuid: str, nics: list[contract.NicDescription]) -> None:
        _write_atomically(self._record(vm_uuid), json.dumps(nics, sort_keys=True))

    def _read_peers(self) -> Peers:
        try:
            stored: dict[str, list[list[Any]]] = json.loads(self._peers.read_text())
        except FileNotFoundError:
            return {}
        return {
            int(vni): {(str(address), int(port)) for address, port in entries}
            for vni, entries in stored.items()
        }

    def _write_peers(self, peers: Peers) -> None:
        stored = {
            str(vni): sorted([address, port] for address, port in entries) for vni, entries in peers.items()
        }
        _write_atomically(self._peers, json.dumps(stored, sort_keys=True))


def _parse_peers(peers: Mapping[str, Sequence[contract.OverlayPeer]]) -> Peers:
    parsed: Peers = {}
    for vni, entries in peers.items():
        if not vni.isdigit() or not 1 <= int(vni) < 2**24:
            raise NetworkError(f"peers: {vni!r} is not a VNI")
        try:
            parsed[int(vni)] = {
                (str(ipaddress.IPv4Address(entry["address"])), _port(entry["port"])) for entry in entries
            }
        except (KeyError, TypeError, ValueError) as exc:
            raise NetworkError(f"peers of VNI {vni}: {exc!r}") from None
    return parsed


def _port(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 65536:
        raise ValueError(f"{value!r} is not a UDP port")
    return value


def _write_atomically(path: Path, text: str) -> None:
    scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    scratch.write_text(text)
    scratch.replace(path)
