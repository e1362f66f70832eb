"""The networks and NICs a node builds, validated once from the contract's dictionaries.

Everything the data plane does starts from these frozen values: a bad description (a MAC that is not
one, an address outside the network, a VNI out of range) is refused here with a message naming the
field, before any device exists.
"""

import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from workers import contract

from . import names

MAX_VNI = 2**24 - 1
MIN_MTU = 576  # the smallest IPv4 datagram every host must accept (RFC 791)
MAX_MTU = 9000 - 50  # a jumbo-frame underlay less VXLAN's 50 bytes
MAC_PATTERN = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
# The distributed gateway's MAC: locally administered, unicast, "nc", then the VNI's three bytes.
GATEWAY_MAC_PREFIX = "02:6e:63"


T = TypeVar("T")


class NetworkError(Exception):
    """The data plane cannot do what was asked: a bad description, or a failed kernel operation."""


def gateway_mac(vni: int) -> str:
    """The gateway's MAC on network ``vni``: the same on every node, so a moved guest's ARP cache holds."""
    return f"{GATEWAY_MAC_PREFIX}:{vni >> 16 & 0xFF:02x}:{vni >> 8 & 0xFF:02x}:{vni & 0xFF:02x}"


@dataclass(frozen=True)
class Network:
    id: str
    name: str
    vni: int
    cidr: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address
    dns: tuple[ipaddress.IPv4Address, ...]
    mtu: int
    external: bool
    physical_network: str

    @property
    def gateway_mac(self) -> str:
        return gateway_mac(self.vni)

    def bridge(self, tag: str) -> str:
        return names.bridge_name(tag, self.vni)

    def vxlan(self, tag: str) -> str:
        return names.vxlan_name(tag, self.vni)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Network":
        where = f"network {data.get('name', data.get('id', '?'))!r}"
        vni = _field(data, "vni", int, where)
        if not 1 <= vni <= MAX_VNI:
            raise NetworkError(f"{where}: vni must be 1 to {MAX_VNI}, not {vni}")
        cidr = _parsed(ipaddress.IPv4Network, _field(data, "cidr", str, where), f"{where}: cidr")
        gateway = _parsed(ipaddress.IPv4Address, _field(data, "gateway", str, where), f"{where}: gateway")
        dns = tuple(
            _parsed(ipaddress.IPv4Address, server, f"{where}: dns")
            for server in _field(data, "dns", list, where)
        )
        if cidr.prefixlen > 30:
            raise NetworkError(f"{where}: cidr {cidr} leaves no room for a gateway and guests")
        if gateway not in cidr or gateway in (cidr.network_address, cidr.broadcast_address):
            raise NetworkError(f"{where}: gateway {gateway} is not a host address of {cidr}")
        mtu = _field(data, "mtu", int, where)
        if not MIN_MTU <= mtu <= MAX_MTU:
            raise NetworkError(f"{where}: mtu must be {MIN_MTU} to {MAX_MTU}, not {mtu}")
        return cls(
            id=str(data.get("id", "")),
            name=str(data.get("name", "")),
            vni=vni,
            cidr=cidr,
            gateway=gateway,
            dns=dns,
            mtu=mtu,
            external=_field(data, "external", bool, where),
            physical_network=_field(data, "physical_network", str, where),
        )


@dataclass(frozen=True)
class Nic:
    """NIC ``index`` of VM ``vm_uuid``: its tap on this node, its MAC and address, its network."""

    vm_uuid: str
    index: int
    mac: str
    ipv4: ipaddress.IPv4Address
    network: Network

    def tap(self, tag: str) -> str:
        return names.tap_name(tag, self.vm_uuid, self.index)


def parse_nics(vm_uuid: str, nics: Sequence[Mapping[str, Any]]) -> tuple[Nic, ...]:
    """The NICs of one VM, in guest order, from ``VmDescription.nics``."""
    if not isinstance(nics, Sequence) or len(nics) > names.MAX_NICS:
        raise NetworkError(f"VM {vm_uuid}: nics must be a list of at most {names.MAX_NICS}")
    parsed = []
    for index, nic in enumerate(nics):
        where = f"VM {vm_uuid} nics[{index}]"
        if not isinstance(nic, Mapping):
            raise NetworkError(f"{where}: expected an object, not {type(nic).__name__}")
        mac = _field(nic, "mac", str, where)
        if not MAC_PATTERN.match(mac) or int(mac[:2], 16) & 1:
            raise NetworkError(
                f"{where}: mac must be a lower-case unicast MAC like 52:54:00:12:34:56, not {mac!r}"
            )
        network = Network.from_dict(_field(nic, "network", dict, where))
        ipv4 = _parsed(ipaddress.IPv4Address, _field(nic, "ipv4", str, where), f"{where}: ipv4")
        if ipv4 not in network.cidr or ipv4 in (
            network.gateway,
            network.cidr.network_address,
            network.cidr.broadcast_address,
        ):
            raise NetworkError(f"{where}: ipv4 {ipv4} is not a guest address of {network.cidr}")
        if mac == network.gateway_mac:
            raise NetworkError(f"{where}: mac {mac} is the network's gateway MAC")
        try:
            parsed.append(Nic(vm_uuid=vm_uuid, index=index, mac=mac, ipv4=ipv4, network=network))
            parsed[-1].tap("0000")  # the uuid must make a tap name
        except ValueError as exc:
            raise NetworkError(f"{where}: {exc}") from None
    return tuple(parsed)


def vm_nics(vm: Mapping[str, Any]) -> list[contract.NicDescription]:
    """The NICs of a ``VmDescription`` (or a stored spec): none when the key is absent."""
    nics = vm.get("nics") or []
    if not isinstance(nics, list):
        raise NetworkError(f"VM {vm.get('id', '?')}: nics must be a list")
    return nics


def _parsed(kind: Callable[[Any], T], value: object, what: str) -> T:
    try:
        return kind(value)
    except ValueError as exc:
        raise NetworkError(f"{what} {value!r} is not valid: {exc}") from None


def _field(data: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in data:
        raise NetworkError(f"{where}: {key} is missing")
    value = data[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise NetworkError(f"{where}: {key} must be a {kind.__name__}, not {value!r}")
    return value
