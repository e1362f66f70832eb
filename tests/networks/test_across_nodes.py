"""VM networks with real guests on node workers in separate namespaces: the overlay between nodes, tenant
isolation, anti-spoofing, a TCP connection through a live migration, delete and a node's restart."""

import json
import secrets
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from apps.migrations.models import Migration
from apps.vms.models import VM, Image
from bench.migration.outage import Probe
from tests.netlab import Namespace, NetLab
from tests.workers.node.conftest import Cluster, wait_for
from workers.guest.boot import GuestChannel
from workers.net import names

pytestmark = [
    pytest.mark.integration,
    pytest.mark.qemu,
    pytest.mark.netns,
    pytest.mark.django_db(transaction=True),
]


def _subnet() -> str:
    return f"10.{100 + secrets.randbelow(50)}.{secrets.randbelow(256)}"


@contextmanager
def guest_channel(cluster: Cluster, vm_id: str) -> Iterator[GuestChannel]:
    node = VM.objects.select_related("node").get(pk=vm_id).node
    assert node is not None
    guest = GuestChannel.connect(cluster.data_dirs[node.name] / "run" / vm_id / "guest.sock", timeout=30)
    try:
        guest.wait_for(r"tick \d+", 60)
        yield guest
    finally:
        guest.close()


def create_vm(api: Any, name: str, image: Image, node: str, networks: list[str]) -> dict[str, Any]:
    payload = {"name": name, "image": image.name, "vcpus": 1, "memory_mb": 128, "disk_gb": 1, "node": node}
    response = api.post("/api/v1/vms/", payload | {"networks": networks}, format="json")
    assert response.status_code == 202, response.json()
    body: dict[str, Any] = response.json()
    wait_for(lambda: VM.objects.get(pk=body["id"]).state == "running", 90, f"{name} to run")
    return body


def leased(cluster: Cluster, vm: dict[str, Any]) -> str:
    """The address the guest got by DHCP, once it has one; it must be the one the API shows."""
    with guest_channel(cluster, vm["id"]) as guest:

        def address() -> str | None:
            words = guest.request("net", timeout=20)
            return words[1] if words[0] == "eth0" and words[1] != "-" else None

        cidr = wait_for(address, 60, f"{vm['name']}'s DHCP lease", interval=1)
        words = guest.request("net")
    assert cidr.split("/")[0] == vm["nics"][0]["ipv4"], (cidr, vm["nics"])
    assert words[2] == vm["nics"][0]["mac"], (words, vm["nics"])
    return vm["nics"][0]["ipv4"]


def ask(cluster: Cluster, vm_id: str, command: str, *args: str, timeout: float = 30) -> list[str]:
    with guest_channel(cluster, vm_id) as guest:
        return guest.request(command, *args, timeout=timeout)


def links(host: Namespace) -> set[str]:
    return set(host.links())


def test_one_network_spans_nodes_and_stays_apart_from_other_tenants(
    cluster: Cluster, api, other_api, guest_image: Image
):
    node1, node2 = list(cluster.nodes)
    blue = _subnet()
    assert (
        api.post("/api/v1/networks/", {"name": "blue", "cidr": f"{blue}.0/24"}, format="json").status_code
        == 201
    )
    # Another tenant may use the very same subnet: its overlay is its own. (Its gateway at the top end
    # leaves it the first address, so that its guest's address is one the others do not hold.)
    response = other_api.post(
        "/api/v1/networks/", {"name": "red", "cidr": f"{blue}.0/24", "gateway": f"{blue}.254"}, format="json"
    )
    assert response.status_code == 201, response.json()
    a = create_vm(api, "a", guest_image, node1, ["blue"])
    b = create_vm(api, "b", guest_image, node2, ["blue"])
    c = create_vm(other_api, "c", guest_image, node2, ["red"])
    a_ip, b_ip, c_ip = leased(cluster, a), leased(cluster, b), leased(cluster, c)
    assert len({a["nics"][0]["mac"], b["nics"][0]["mac"], c["nics"][0]["mac"]}) == 3

    # Across the overlay: ping and TCP (the guest's echo service) between nodes.
    assert ask(cluster, a["id"], "reach", b_ip) == ["ok"]
    assert ask(cluster, a["id"], "tcp", b_ip, "7", "hello-overlay") == ["hello-overlay"]
    # The other tenant's guest, in the same subnet and on the same node as b, reaches neither of them.
    assert c_ip not in (a_ip, b_ip)
    assert ask(cluster, c["id"], "reach", a_ip) == ["fail"]
    assert ask(cluster, c["id"], "reach", b_ip) == ["fail"]
    assert ask(cluster, c["id"], "tcp", b_ip, "7", "hello-neighbour") == ["-"]

    # A guest that forges its source address or MAC is not heard; its own address still works.
    spare = f"{blue}.200"
    assert ask(cluster, a["id"], "spoof-ip", spare) == ["fail"]
    assert ask(cluster, a["id"], "spoof-mac", "52:54:00:de:ad:01") == ["fail"]
    assert ask(cluster, a["id"], "reach", b_ip) == ["ok"]
    # A guest playing DHCP server is never heard: a new VM beside it gets the address the API gave.
    assert ask(cluster, a["id"], "dhcp-serve") == ["started"]
    d = create_vm(api, "d", guest_image, node1, ["blue"])
    assert leased(cluster, d) not in {a_ip, b_ip}


def _host_of(lab: NetLab, cluster: Cluster, node: str) -> Namespace:
    return lab.hosts[list(cluster.nodes).index(node)]


def _tag(cluster: Cluster, node: str) -> str:
    return names.node_tag(node, cluster.data_dirs[node].resolve())


def test_a_tcp_connection_from_the_lan_survives_a_live_migration(
    cluster: Cluster, api, staff_api, guest_image: Image, lab: NetLab
):
    node1, node2 = list(cluster.nodes)
    prefix = _subnet()
    response = staff_api.post(
        "/api/v1/networks/",
        {"name": "lan", "cidr": f"{prefix}.0/24", "shared": True, "physical_network": "lan"},
        format="json",
    )
    assert response.status_code == 201, response.json()
    client = lab.clients[0]
    client.run("ip", "addr", "add", f"{prefix}.250/24", "dev", "lan")
    vm = create_vm(api, "mover", guest_image, node1, ["lan"])
    address = leased(cluster, vm)
    wait_for(
        lambda: client.run("ping", "-c", "1", "-W", "1", address, check=False).returncode == 0,
        30,
        "the guest to answer the client",
    )

    probe = Probe(client.netns, address)

    def connected() -> bool:
        return bool(client.run("ss", "-Htn", "dst", f"{address}:9000").stdout.strip())

    wait_for(connected, 30, "the client's connection to the guest's counter")
    with guest_channel(cluster, vm["id"]) as guest:
        for _ in range(10):  # a second of traffic before the move
            guest.wait_for(r"tick \d+", 30)
    response = api.post(
        f"/api/v1/vms/{vm['id']}/migrate/", {"dest_node": node2, "mode": "live"}, format="json"
    )
    assert response.status_code == 202, response.json()
    migration_id = response.json()["id"]
    wait_for(
        lambda: Migration.objects.get(pk=migration_id).status in ("completed", "failed", "cancelled"),
        240,
        "the migration to end",
        interval=0.5,
    )
    migration = Migration.objects.get(pk=migration_id)
    assert migration.status == "completed", migration.error
    # Traffic keeps flowing on the destination for two seconds before the probe ends.
    with guest_channel(cluster, vm["id"]) as guest:
        for _ in range(20):
            guest.wait_for(r"tick \d+", 30)
    seen = probe.finish()
    body = api.get(f"/api/v1/migrations/{migration_id}/").json()
    print(f"guest pause {body['downtime_ms']} ms; client view {json.dumps(seen)}")
    assert seen["tcp"]["closed"] == "", seen
    assert seen["tcp"]["in_order"] and seen["tcp"]["lines"] > 100, seen
    assert seen["ping"]["received"] > 0.8 * seen["ping"]["sent"], seen
    # The outage a client sees stays near the guest's own pause (TCG and a shared CI machine: wide margin).
    assert seen["ping"]["longest_gap_ms"] < body["downtime_ms"] + 2000, (seen, body["downtime_ms"])

    # The source removed its tap after the switch; the destination holds the VM's only one.
    tap1 = names.tap_name(_tag(cluster, node1), vm["id"], 0)
    tap2 = names.tap_name(_tag(cluster, node2), vm["id"], 0)
    wait_for(lambda: tap1 not in links(_host_of(lab, cluster, node1)), 30, "the source's tap to go")
    assert tap2 in links(_host_of(lab, cluster, node2))
    assert api.get(f"/api/v1/vms/{vm['id']}/").json()["nics"] == vm["nics"]


def test_delete_frees_the_address_and_a_restarted_node_rebuilds_its_network(
    cluster: Cluster, api, guest_image: Image, lab: NetLab
):
    node1, node2 = list(cluster.nodes)
    prefix = _subnet()
    assert (
        api.post("/api/v1/networks/", {"name": "net", "cidr": f"{prefix}.0/24"}, format="json").status_code
        == 201
    )
    host1 = _host_of(lab, cluster, node1)
    tag = _tag(cluster, node1)
    first = create_vm(api, "first", guest_image, node1, ["net"])
    tap = names.tap_name(tag, first["id"], 0)
    assert tap in links(host1)
    assert api.delete(f"/api/v1/vms/{first['id']}/").status_code in (202, 204)
    wait_for(lambda: VM.objects.get(pk=first["id"]).state == "deleted", 60, "the VM's deletion")
    wait_for(lambda: tap not in links(host1), 30, "its tap to go")
    # The network is gone from the node with its last VM; the address is free again.
    vni = api.get("/api/v1/networks/").json()["results"][0]["vni"]
    assert names.bridge_name(tag, vni) not in links(host1)
    again = create_vm(api, "again", guest_image, node1, ["net"])
    assert again["nics"][0]["ipv4"] == first["nics"][0]["ipv4"]
    peer = create_vm(api, "peer", guest_image, node2, ["net"])
    leased(cluster, again)
    peer_ip = leased(cluster, peer)

    # The node worker dies; meanwhile its bridge is lost and a device of its own is left over.
    cluster.nodes[node1].kill(signal.SIGKILL)
    bridge = names.bridge_name(tag, vni)
    host1.run("ip", "link", "del", bridge)
    leftover = names.bridge_name(tag, 0xFFFFF)
    host1.run("ip", "link", "add", leftover, "type", "bridge")
    assert ask(cluster, again["id"], "reach", peer_ip) == ["fail"]
    cluster.start_node(node1)
    wait_for(lambda: bridge in links(host1) and leftover not in links(host1), 60, "the node to reconcile")
    assert host1.links()[names.tap_name(tag, again["id"], 0)].get("master") == bridge
    wait_for(lambda: ask(cluster, again["id"], "reach", peer_ip) == ["ok"], 60, "the overlay to work again")
