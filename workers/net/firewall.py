"""The node's nftables rules: one ``bridge`` and one ``inet`` table named after the node's tag.

Bridge table (frames): each tap's frames pass its own chain (source MAC, source IPv4, ARP sender
must be the NIC's own; DHCP from 0.0.0.0 allowed; no DHCP server packets; IPv4 and ARP only), and
DHCP, ARP for a gateway and frames from a gateway MAC never cross a VXLAN device: every node answers
those itself (the distributed gateway). A provider network has no VXLAN device: the LAN its uplinks
are bridged to joins its nodes.
Inet table (routed packets, and bridged ones when br_netfilter is loaded): guests reach the node
only for DHCP and ICMP to their own gateway; no forwarding into, out of or between networks, except
NAT out of the node for ``external`` networks.

The whole ruleset is replaced in one ``nft -f`` transaction (create, delete, define), so a change is
atomic and idempotent, and rules match this node's own device names only (other nodes' tables in the
same namespace are untouched and unaffected).
"""

from collections.abc import Sequence
from pathlib import Path

from .commands import nft
from .model import Network, Nic

FAMILIES = ("bridge", "inet")
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
DHCP_PORTS = "{ 67, 68 }"


def table_name(tag: str) -> str:
    return f"novacron_{tag}"


def apply(tag: str, nics: Sequence[Nic]) -> None:
    """Replace this node's tables with the rules for ``nics``."""
    networks = {nic.network.vni: nic.network for nic in nics}
    script = render(tag, nics, list(networks.values()))
    nft(script)
    if any(network.external for network in networks.values()):
        IP_FORWARD.write_text("1")  # never turned off again: the host may route for others too


def remove(tag: str) -> None:
    nft(_drop_tables(tag))


def render(tag: str, nics: Sequence[Nic], networks: Sequence[Network]) -> str:
    script = _drop_tables(tag)
    if not networks:
        return script
    return script + _bridge_table(tag, nics, networks) + _inet_table(tag, networks)


def _drop_tables(tag: str) -> str:
    # "table" creates the table when missing, so "delete" never fails: the pair is idempotent.
    return "".join(
        f"table {family} {table_name(tag)}\ndelete table {family} {table_name(tag)}\n" for family in FAMILIES
    )


def _elements(values: Sequence[str]) -> str:
    return f"elements = {{ {', '.join(values)} }}" if values else ""


def _bridge_table(tag: str, nics: Sequence[Nic], networks: Sequence[Network]) -> str:
    overlay = f'"x{tag}*"'
    gateway_macs = _elements([network.gateway_mac for network in networks])
    gateway_ips = _elements([str(network.gateway) for network in networks])
    guest_chains = "".join(
        f"""
  chain guest_{nic.tap(tag)} {{
    ether saddr != {nic.mac} drop
    ether type != {{ ip, arp, 0x8035 }} drop  # 0x8035: RARP, QEMU's announce-self
    arp saddr ether != {nic.mac} drop
    arp saddr ip != {{ {nic.ipv4}, 0.0.0.0 }} drop
    ip saddr 0.0.0.0 ip daddr 255.255.255.255 udp sport 68 udp dport 67 return
    ip saddr != {nic.ipv4} drop
    ip protocol udp udp sport 67 drop
  }}
"""
        for nic in nics
    )
    taps = ", ".join(f'"{nic.tap(tag)}" : jump guest_{nic.tap(tag)}' for nic in nics)
    per_tap = f"    iifname vmap {{ {taps} }}\n" if taps else ""
    from_overlay = f"""    iifname {overlay} ip protocol udp udp dport {DHCP_PORTS} drop
    iifname {overlay} arp daddr ip @gateway_ips drop
    iifname {overlay} arp saddr ip @gateway_ips drop
    iifname {overlay} ether saddr @gateway_macs drop
"""
    return f"""table bridge {table_name(tag)} {{
  set gateway_macs {{ type ether_addr; {gateway_macs} }}
  set gateway_ips {{ type ipv4_addr; {gateway_ips} }}
{guest_chains}
  chain forward {{
    type filter hook forward priority filter; policy accept;
{per_tap}{from_overlay}    oifname {overlay} ip protocol udp udp dport {DHCP_PORTS} drop
    oifname {overlay} arp daddr ip @gateway_ips drop
    oifname {overlay} ether saddr @gateway_macs drop
  }}

  chain input {{
    type filter hook input priority filter; policy accept;
{per_tap}{from_overlay}  }}

  chain output {{
    type filter hook output priority filter; policy accept;
    oifname {overlay} ether saddr @gateway_macs drop
  }}
}}
"""


def _inet_table(tag: str, networks: Sequence[Network]) -> str:
    bridges = f'"b{tag}*"'
    external = [f'"{network.bridge(tag)}"' for network in networks if network.external]
    outbound = ""
    nat = ""
    if external:
        outbound = f"    iifname {{ {', '.join(external)} }} accept\n"
        nat = f"""
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    iifname {{ {", ".join(external)} }} oifname != {bridges} masquerade
  }}
"""
    # With br_netfilter (bridge-nf-call-iptables, global and on by default once loaded) frames
    # bridged within one network pass this hook too, in and out through the same bridge.
    own_gateway = "".join(
        f'    iifname "{network.bridge(tag)}" ip daddr {network.gateway} icmp type echo-request accept\n'
        for network in networks
    )
    bridged = "".join(
        f'    iifname "{network.bridge(tag)}" oifname "{network.bridge(tag)}" accept\n'
        for network in networks
    )
    return f"""table inet {table_name(tag)} {{
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname {bridges} ct state established,related accept
    iifname {bridges} udp dport 67 accept
{own_gateway}    iifname {bridges} drop
  }}

  chain forward {{
    type filter hook forward priority filter; policy accept;
{bridged}    iifname {bridges} oifname {bridges} drop
{outbound}    iifname {bridges} drop
    oifname {bridges} ct state established,related accept
    oifname {bridges} drop
  }}
{nat}}}
"""
