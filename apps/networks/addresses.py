"""Address arithmetic of networks, without the database: host ranges, the lowest free addresses, MACs
and the choice of a default network's subnet.

Rules: a NIC never gets the network's, the broadcast or the gateway address; addresses are taken
lowest first; MACs carry QEMU's locally administered prefix ``52:54:00``.
"""

import ipaddress
import secrets
import socket
from collections.abc import Iterable
from typing import Final

MAC_PREFIX: Final = "52:54:00"
# Where default networks are carved from: a /24 of 10.0.0.0/8 per project.
DEFAULT_POOL: Final = ipaddress.IPv4Network("10.0.0.0/8")
DEFAULT_PREFIX: Final = 24


def first_host(cidr: str) -> str:
    """The default gateway of a network: its first host address."""
    return str(ipaddress.IPv4Network(cidr).network_address + 1)


def lowest_free(cidr: str, gateway: str, taken: Iterable[str], count: int) -> list[str]:
    """Up to ``count`` free host addresses of ``cidr``, lowest first (fewer when it runs out)."""
    subnet = ipaddress.IPv4Network(cidr)
    # inet_aton/ntoa, not ipaddress objects: a create reads every address of its network (a /24's
    # 250 parsed by ipaddress cost ~2 ms of a ~14 ms create; these, ~50 us).
    used = {_number(address) for address in taken}
    used.add(_number(gateway))
    found: list[str] = []
    for value in range(int(subnet.network_address) + 1, int(subnet.broadcast_address)):
        if len(found) == count:
            break
        if value not in used:
            found.append(socket.inet_ntoa(value.to_bytes(4, "big")))
    return found


def _number(address: str) -> int:
    return int.from_bytes(socket.inet_aton(address), "big")


def host_count(cidr: str) -> int:
    """Addresses NICs may get: the hosts of ``cidr`` but the gateway."""
    return ipaddress.IPv4Network(cidr).num_addresses - 3


def random_macs(count: int, avoid: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """``count`` distinct random MACs with QEMU's prefix (lower case, colon-separated), none of
    ``avoid``."""
    macs: dict[str, None] = {}
    while len(macs) < count:
        tail = secrets.token_bytes(3)
        mac = f"{MAC_PREFIX}:{tail[0]:02x}:{tail[1]:02x}:{tail[2]:02x}"
        if mac not in avoid:
            macs[mac] = None
    return list(macs)


def overlapping(cidr: str, others: Iterable[str]) -> list[str]:
    """The networks of ``others`` that share addresses with ``cidr``."""
    subnet = ipaddress.IPv4Network(cidr)
    return [other for other in others if subnet.overlaps(ipaddress.IPv4Network(other))]


def free_default_subnet(avoid: Iterable[str], prefer_avoiding: Iterable[str] = ()) -> str | None:
    """The lowest /24 of 10.0.0.0/8 that overlaps none of ``avoid``, and if possible none of
    ``prefer_avoiding`` either (other projects' networks: fewer clashes when they are ever joined);
    None when every /24 is taken."""

    def blocks(cidrs: Iterable[str]) -> set[int]:
        taken: set[int] = set()
        for cidr in cidrs:
            subnet = ipaddress.IPv4Network(cidr)
            if not subnet.overlaps(DEFAULT_POOL):
                continue
            if subnet.prefixlen <= DEFAULT_POOL.prefixlen:
                return set(range(1 << (DEFAULT_PREFIX - DEFAULT_POOL.prefixlen)))
            base, shift = int(DEFAULT_POOL.network_address), 32 - DEFAULT_PREFIX
            first = (int(subnet.network_address) - base) >> shift
            last = (int(subnet.broadcast_address) - base) >> shift
            taken.update(range(first, last + 1))
        return taken

    refused = blocks(avoid)
    disliked = refused | blocks(prefer_avoiding)
    size = 1 << (DEFAULT_PREFIX - DEFAULT_POOL.prefixlen)
    for wanted in (disliked, refused):
        for block in range(size):
            if block not in wanted:
                address = int(DEFAULT_POOL.network_address) + (block << (32 - DEFAULT_PREFIX))
                return f"{ipaddress.IPv4Address(address)}/{DEFAULT_PREFIX}"
    return None
