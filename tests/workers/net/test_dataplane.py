"""The data plane across "hosts": nodes in namespaces on a shared underlay, guests as namespaces."""

import json
import sys
from pathlib import Path

import pytest

from tests.workers.net.conftest import Guest, Lab, network, nic
from workers.net import names

pytestmark = [pytest.mark.netns]

UDP_RECEIVER = """
import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("", int(sys.argv[1])))
sock.settimeout(float(sys.argv[2]))
try:
    print(sock.recvfrom(100)[0].decode())
except TimeoutError:
    print("nothing")
"""

UDP_SENDER = """
import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
sock.bind((sys.argv[1], int(sys.argv[2])))
for _ in range(5):
    sock.sendto(b"hello", (sys.argv[3], int(sys.argv[4])))
"""


def heard(sender: Guest, receiver: Guest, *, source: str, sport: int, destination: str, dport: int) -> bool:
    """Whether ``receiver`` hears UDP that ``sender`` sends from ``source:sport``."""
    listener = receiver.namespace.popen(
        [sys.executable, "-c", UDP_RECEIVER, str(dport), "3"], stdout=-1, text=True
    )
    receiver.run("sh", "-c", f"until ss -lun | grep -q ':{dport} '; do sleep 0.05; done", timeout=10)
    sender.run(sys.executable, "-c", UDP_SENDER, source, str(sport), destination, str(dport))
    output, _ = listener.communicate(timeout=10)
    return output.strip() == "hello"


def test_guests_of_one_network_on_two_nodes_reach_each_other_and_no_other_network_reaches_them(
    lab: Lab,
) -> None:
    node1, node2, _ = lab.nodes
    blue, red = network(100 + 1, 11), network(100 + 2, 12)
    blue1, blue2 = lab.guest(node1, nic(blue, 10)), lab.guest(node2, nic(blue, 20))
    red1, red2 = lab.guest(node1, nic(red, 10)), lab.guest(node2, nic(red, 20))
    lab.connect()
    for guest in (blue1, blue2, red1, red2):
        guest.configure()

    assert blue1.pings(blue2.ipv4)
    assert red2.pings(red1.ipv4)
    # The overlay carried it: node1 learned blue2's MAC behind its VXLAN device, at node2's address.
    fdb = node1.host.run("bridge", "fdb", "show", "dev", names.vxlan_name(node1.tag, blue["vni"])).stdout
    assert f"{blue2.nic['mac']} dst {node2.host.address}" in fdb
    # Another network: not routed by the node, on this node or across the overlay.
    assert not red1.pings(blue1.ipv4, count=1)
    assert not red1.pings(blue2.ipv4, count=1)
    assert not blue2.pings(red2.ipv4, count=1)
    # Guests reach their gateway (ICMP) but nothing else on the node.
    assert blue1.pings(blue["gateway"])
    assert not blue1.pings(red["gateway"], count=1)


def test_dhcp_answers_each_guest_from_its_own_node_only(lab: Lab, tmp_path: Path) -> None:
    node1, node2, _ = lab.nodes
    blue = network(200, 21)
    guest1, guest2 = lab.guest(node1, nic(blue, 31)), lab.guest(node2, nic(blue, 32))
    lab.connect()

    lease1 = guest1.dhcp(tmp_path)
    assert (lease1["ip"], lease1["router"], lease1["dns"].strip(), lease1["mtu"]) == (
        guest1.ipv4,
        blue["gateway"],
        blue["dns"][0],
        "1400",
    )
    assert guest2.dhcp(tmp_path)["ip"] == guest2.ipv4
    leases = {node.tag: (node.state_dir / "dhcp" / "200" / "leases").read_text() for node in (node1, node2)}
    assert guest1.nic["mac"] in leases[node1.tag] and guest1.nic["mac"] not in leases[node2.tag]
    assert guest2.nic["mac"] in leases[node2.tag] and guest2.nic["mac"] not in leases[node1.tag]

    # A MAC that node2 hosts, sent from a port of node1's bridge that is no NIC of node1: node1 does
    # not answer it, and node2's server (which knows the MAC) never hears it across the overlay.
    stranger = lab.netlab.add_namespace("stranger")
    node1.host.run(
        "ip", "link", "add", "strange0", "type", "veth", "peer", "name", "eth0", "netns", stranger.netns
    )
    node1.host.run("ip", "link", "set", "strange0", "master", names.bridge_name(node1.tag, 200), "up")
    stranger.run("ip", "link", "set", "eth0", "address", guest2.nic["mac"], "up")
    guest2.run("ip", "link", "set", "eth0", "down")
    assert Guest(stranger, node1, "", guest2.nic).dhcp(tmp_path) == {}


def test_a_guest_cannot_spoof_its_mac_or_address_nor_serve_dhcp(lab: Lab) -> None:
    node1, node2, _ = lab.nodes
    blue = network(300, 31)
    sender, neighbour = lab.guest(node1, nic(blue, 41)), lab.guest(node1, nic(blue, 42))
    remote = lab.guest(node2, nic(blue, 43))
    lab.connect()
    for guest in (sender, neighbour, remote):
        guest.configure()
    for target in (neighbour, remote):  # no ARP needed below: what is dropped is the spoofed frame
        sender.run("ip", "neigh", "replace", target.ipv4, "lladdr", target.nic["mac"], "dev", "eth0")

    assert heard(sender, remote, source=sender.ipv4, sport=5000, destination=remote.ipv4, dport=5001)
    spoofed_ip = "172.31.31.99"
    sender.run("ip", "addr", "add", f"{spoofed_ip}/24", "dev", "eth0")
    assert not heard(sender, remote, source=spoofed_ip, sport=5000, destination=remote.ipv4, dport=5001)
    assert not heard(sender, neighbour, source=spoofed_ip, sport=5000, destination=neighbour.ipv4, dport=5001)

    sender.run("ip", "link", "set", "eth0", "address", "52:54:00:66:66:66")
    assert not heard(
        sender, neighbour, source=sender.ipv4, sport=5000, destination=neighbour.ipv4, dport=5001
    )
    sender.run("ip", "link", "set", "eth0", "address", sender.nic["mac"])

    # A DHCP server in a guest is not heard; the same packet from another port is.
    assert not heard(sender, neighbour, source=sender.ipv4, sport=67, destination="172.31.31.255", dport=68)
    assert heard(sender, neighbour, source=sender.ipv4, sport=1067, destination="172.31.31.255", dport=68)


def test_reconcile_after_a_restart_rebuilds_what_the_vms_need_and_removes_the_rest(lab: Lab) -> None:
    node1, node2, _ = lab.nodes
    blue, red = network(400, 41), network(401, 42)
    kept, remote = lab.guest(node1, nic(blue, 51)), lab.guest(node2, nic(blue, 52))
    gone = lab.guest(node1, nic(red, 53))
    lab.connect()
    kept.configure()
    remote.configure()
    # A host reboot: the kernel state is lost (the guest's "tap" comes back as QEMU recreates it);
    # meanwhile VM "gone" was deleted; a half-made tap of another VM lingers.
    node1.host.run("ip", "link", "del", names.bridge_name(node1.tag, 400))
    node1.host.run("ip", "link", "del", names.vxlan_name(node1.tag, 400))
    node1.host.run("nft", "delete", "table", "bridge", f"novacron_{node1.tag}")
    leftover = names.tap_name(node1.tag, "0d7f5a44-0000-4000-8000-000000000000", 0)
    node1.host.run("ip", "tuntap", "add", "dev", leftover, "mode", "tap")
    other_node = "ffff" if node1.tag != "ffff" else "eeee"
    foreign = names.tap_name(other_node, gone.vm, 0)
    node1.host.run("ip", "tuntap", "add", "dev", foreign, "mode", "tap")

    node1.call("reconcile", {"vms": {kept.vm: [kept.nic]}})  # the peers come from node1's last record

    assert node1.own_links() == {
        names.bridge_name(node1.tag, 400),
        names.vxlan_name(node1.tag, 400),
        names.tap_name(node1.tag, kept.vm, 0),
    }
    assert foreign in node1.host.links()  # another node's device in the same namespace stays
    assert not (node1.state_dir / "dhcp" / "401").exists()
    assert kept.pings(remote.ipv4)
    assert f"guest_{names.tap_name(node1.tag, kept.vm, 0)}" in node1.snapshot()[2]


def test_everything_twice_changes_nothing_and_another_nodes_devices_are_left_alone(lab: Lab) -> None:
    node1 = lab.nodes[0]
    blue = network(500, 51, external=True)
    guest = lab.guest(node1, nic(blue, 61))
    lab.connect()
    before = node1.snapshot()
    dnsmasq = (node1.state_dir / "dhcp" / "500" / "dnsmasq.pid").read_text()

    node1.attach(guest.vm, [guest.nic])
    lab.connect()
    node1.call("reconcile", {"vms": {guest.vm: [guest.nic]}})
    assert node1.snapshot() == before
    assert (node1.state_dir / "dhcp" / "500" / "dnsmasq.pid").read_text() == dnsmasq

    # A second node in node1's namespace (as make run's local nodes share one): its own devices and
    # table, and neither removes the other's.
    twin = type(node1)(host=node1.host, state_dir=node1.state_dir.with_name("twin"), port=node1.port + 1)
    twin_guest = lab.guest(twin, nic(blue, 62))
    assert twin.own_links() and node1.own_links()
    node1.call("reconcile", {"vms": {}})
    node1.call("reconcile", {"vms": {}})
    assert node1.own_links() == set()
    assert twin.own_links() == {
        names.bridge_name(twin.tag, 500),
        names.vxlan_name(twin.tag, 500),
        names.tap_name(twin.tag, twin_guest.vm, 0),
    }
    assert f"novacron_{twin.tag}" in node1.host.run("nft", "list", "tables").stdout
    twin.detach(twin_guest.vm)
    twin.detach(twin_guest.vm)
    assert twin.own_links() == set()
    assert f"novacron_{twin.tag}" not in node1.host.run("nft", "list", "tables").stdout
    assert not list((twin.state_dir / "dhcp").iterdir())


def test_peers_follow_the_control_plane_and_complete_drops_unlisted_networks(lab: Lab) -> None:
    node1, node2, node3 = lab.nodes
    blue, red = network(600, 61), network(601, 62)
    lab.guest(node1, nic(blue, 71))
    lab.guest(node1, nic(red, 72))
    vxlan_blue, vxlan_red = names.vxlan_name(node1.tag, 600), names.vxlan_name(node1.tag, 601)

    def flood(vxlan: str) -> set[str]:
        fdb = json.loads(node1.host.run("bridge", "-j", "fdb", "show", "dev", vxlan).stdout)
        return {
            f"{entry['dst']}:{entry.get('port', node1.port)}"
            for entry in fdb
            if entry["mac"] == "00:00:00:00:00:00"
        }

    peer2, peer3 = node2.overlay_peer(), node3.overlay_peer()
    node1.peers({"600": [peer2, peer3], "601": [peer2]})
    assert flood(vxlan_blue) == {f"{peer2['address']}:{peer2['port']}", f"{peer3['address']}:{peer3['port']}"}
    node1.peers({"600": [peer3, node1.overlay_peer()]}, complete=False)  # itself is never its own peer
    assert flood(vxlan_blue) == {f"{peer3['address']}:{peer3['port']}"}
    assert flood(vxlan_red) == {f"{peer2['address']}:{peer2['port']}"}
    node1.peers({"600": [peer2]}, complete=True)
    assert flood(vxlan_red) == set()
    assert flood(vxlan_blue) == {f"{peer2['address']}:{peer2['port']}"}


def test_bad_requests_are_refused_with_a_reason_and_leave_nothing(lab: Lab) -> None:
    node1 = lab.nodes[0]
    blue = network(700, 71, physical="lan")
    refused = node1.call(
        "attach", {"vm": "6b3f4c1e-0000-4000-8000-000000000001", "nics": [nic(blue, 5)]}, check=False
    )
    assert "physical network 'lan'" in refused
    bad = nic(network(701, 72), 5)
    bad["ipv4"] = "10.9.9.9"
    refused = node1.call("attach", {"vm": "6b3f4c1e-0000-4000-8000-000000000002", "nics": [bad]}, check=False)
    assert "not a guest address of 172.31.72.0/24" in refused
    assert node1.own_links() == set()


def test_a_client_on_a_provider_network_reaches_a_guest_through_the_nodes_uplink(lab: Lab) -> None:
    node1 = lab.nodes[0]
    client = lab.netlab.add_client(node1.host, interface="lan0")
    node1.physical_networks = "lan=lan0"
    provider = network(800, 81, physical="lan")
    guest = lab.guest(node1, nic(provider, 10))
    guest.configure()
    client.run("ip", "addr", "add", "172.31.81.200/24", "dev", "eth0")

    assert node1.host.links()["lan0"].get("master") == names.bridge_name(node1.tag, 800)
    assert client.run("ping", "-c", "2", "-W", "1", "-i", "0.2", guest.ipv4, check=False).returncode == 0

    node1.detach(guest.vm)  # the network leaves the node: the operator's interface stays, unbridged
    assert "master" not in node1.host.links()["lan0"]
