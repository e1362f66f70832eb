"""Overlay peers: who hosts each network (VMs' nodes, active migrations' destinations), what each
node is sent, once per transaction and node, after creates, deletes, migrations and registrations
(messages read back from the nodes' real Redis queues)."""

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from django.conf import settings

from apps.migrations.choices import MigrationMode
from apps.migrations.services import migration_cancel, migration_request
from apps.networks import peers
from apps.networks.services import network_create
from apps.projects.services import personal_project
from apps.vms.models import Node
from apps.vms.services import (
    VMRequest,
    node_register,
    vm_batch_create,
    vm_create,
    vm_delete,
    vm_record_report,
)
from workers import contract

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _empty_node_queues() -> Iterator[None]:
    _clear()
    yield


def _clear() -> None:
    client = redis.Redis.from_url(settings.REDIS_URL)
    for key in client.scan_iter("node.*"):
        client.delete(key)


def _sent(node: str) -> list[contract.NetworkPeers]:
    """The peers messages queued for ``node``, oldest first."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    found = []
    for raw in reversed(client.lrange(f"node.{node}", 0, -1)):
        message = json.loads(raw)
        if message["headers"]["task"] == contract.NODE_NETWORK_PEERS:
            _args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
            found.append(kwargs)
    return found


@pytest.fixture
def fleet(make_node: Any) -> dict[str, Node]:
    return {
        "a": make_node("a", address="192.0.2.1"),
        "b": make_node("b", address="192.0.2.2", vxlan_port=4790),
        "c": make_node("c", address="192.0.2.3"),
    }


def _vm(user: Any, image: Any, name: str, node: Node, networks: list[str]) -> Any:
    request = VMRequest(
        name=name, image=image, vcpus=1, memory_mb=64, disk_gb=1, node=node, networks=networks
    )
    return vm_create(owner=user, project_id=personal_project(user).pk, request=request)


def test_each_hosting_node_gets_the_others_of_each_network(
    user: Any, image: Any, fleet: dict[str, Node], django_capture_on_commit_callbacks: Any
) -> None:
    project = personal_project(user)
    web = network_create(project_id=project.pk, name="web", cidr="10.5.0.0/24")
    db = network_create(project_id=project.pk, name="db", cidr="10.6.0.0/24")
    _vm(user, image, "w1", fleet["a"], ["web"])
    _vm(user, image, "w2", fleet["b"], ["web", "db"])
    _vm(user, image, "d1", fleet["c"], ["db"])
    a, b, c = (
        {"address": "192.0.2.1", "port": 4789},
        {"address": "192.0.2.2", "port": 4790},
        {"address": "192.0.2.3", "port": 4789},
    )
    web_vni, db_vni = str(web.vni), str(db.vni)
    assert peers.views([web.pk, db.pk]) == {
        "a": {web_vni: [b]},
        "b": {web_vni: [a], db_vni: [c]},
        "c": {db_vni: [b]},
    }
    assert peers.node_view(fleet["b"]) == {"peers": {web_vni: [a], db_vni: [c]}, "complete": True}


def test_a_batch_sends_one_message_per_node_after_commit(
    user: Any, image: Any, fleet: dict[str, Node], django_capture_on_commit_callbacks: Any
) -> None:
    project = personal_project(user)
    network = network_create(project_id=project.pk, name="web", cidr="10.5.0.0/24")
    requests = [
        VMRequest(name=f"vm{i}", image=image, vcpus=1, memory_mb=64, disk_gb=1, networks=["web"])
        for i in range(30)
    ]
    with django_capture_on_commit_callbacks(execute=True):
        _, vms = vm_batch_create(owner=user, project_id=project.pk, requests=requests)
    hosts = {vm.node.name for vm in vms if vm.node}
    assert hosts == {"a", "b", "c"}
    for name in hosts:
        (message,) = _sent(name)
        others = sorted(str(fleet[other].address) for other in hosts - {name})
        assert message["complete"] is False
        assert sorted(peer["address"] for peer in message["peers"][str(network.vni)]) == others


def test_a_vm_beside_others_of_its_network_changes_nobodys_peers(
    user: Any, image: Any, fleet: dict[str, Node], django_capture_on_commit_callbacks: Any
) -> None:
    project = personal_project(user)
    network = network_create(project_id=project.pk, name="web", cidr="10.5.0.0/24")
    with django_capture_on_commit_callbacks(execute=True):
        _vm(user, image, "w1", fleet["a"], ["web"])
        _vm(user, image, "w2", fleet["b"], ["web"])
    _clear()  # the two arrivals' messages
    with django_capture_on_commit_callbacks(execute=True):
        _vm(user, image, "w3", fleet["a"], ["web"])
        _vm(user, image, "w4", fleet["b"], ["web"])
    assert _sent("a") == [] and _sent("b") == []
    with django_capture_on_commit_callbacks(execute=True):
        _vm(user, image, "w5", fleet["c"], ["web"])  # c arrives: everyone hears of it
    heard = {
        name: [
            sorted(peer["address"] for peer in message["peers"][str(network.vni)]) for message in _sent(name)
        ]
        for name in ("a", "b", "c")
    }
    assert heard == {
        "a": [["192.0.2.2", "192.0.2.3"]],
        "b": [["192.0.2.1", "192.0.2.3"]],
        "c": [["192.0.2.1", "192.0.2.2"]],
    }


def test_a_migration_destination_joins_before_the_move_and_leaves_on_roll_back(
    user: Any, image: Any, fleet: dict[str, Node], django_capture_on_commit_callbacks: Any
) -> None:
    network = network_create(project_id=personal_project(user).pk, name="web", cidr="10.5.0.0/24")
    vni = str(network.vni)
    vm = _vm(user, image, "w1", fleet["a"], ["web"])
    vm.state = "running"
    vm.save(update_fields=["state"])
    with django_capture_on_commit_callbacks(execute=True):
        migration = migration_request(vm=vm, requested_by=user, mode=MigrationMode.LIVE, dest_node=fleet["c"])
    assert _sent("c") == [{"peers": {vni: [{"address": "192.0.2.1", "port": 4789}]}, "complete": False}]
    assert _sent("a")[-1] == {"peers": {vni: [{"address": "192.0.2.3", "port": 4789}]}, "complete": False}
    with django_capture_on_commit_callbacks(execute=True):
        migration_cancel(migration=migration, actor="alice")
    assert _sent("a")[-1] == {"peers": {vni: []}, "complete": False}  # the destination left


def test_a_node_leaves_the_others_views_when_its_last_vm_there_is_deleted(
    user: Any, image: Any, fleet: dict[str, Node], django_capture_on_commit_callbacks: Any
) -> None:
    network = network_create(project_id=personal_project(user).pk, name="web", cidr="10.5.0.0/24")
    _vm(user, image, "w1", fleet["a"], ["web"])
    first, last = _vm(user, image, "w2", fleet["b"], ["web"]), _vm(user, image, "w3", fleet["b"], ["web"])
    for gone in (first, last):
        vm_delete(vm=gone)
        with django_capture_on_commit_callbacks(execute=True):
            vm_record_report(
                vm_id=str(gone.pk), operation="delete", ok=True, state="deleted", reason="", node="b"
            )
        # b still hosts the network after the first delete: nobody is told anything.
        expected = [] if gone is first else [{"peers": {str(network.vni): []}, "complete": False}]
        assert _sent("a") == expected
    assert _sent("b") == []


def test_a_registering_node_gets_its_complete_view_and_the_others_its_new_address(
    user: Any, image: Any, fleet: dict[str, Node], django_capture_on_commit_callbacks: Any
) -> None:
    network = network_create(project_id=personal_project(user).pk, name="web", cidr="10.5.0.0/24")
    vni = str(network.vni)
    _vm(user, image, "w1", fleet["a"], ["web"])
    _vm(user, image, "w2", fleet["b"], ["web"])
    with django_capture_on_commit_callbacks(execute=True):
        node_register(
            name="b",
            address="198.51.100.2",
            dwcp_address="198.51.100.2:7000",
            vcpus=16,
            memory_mb=32768,
            disk_gb=500,
            hypervisor={},
            vxlan_port=4791,
            networking="",
        )
    assert _sent("b") == [{"peers": {vni: [{"address": "192.0.2.1", "port": 4789}]}, "complete": True}]
    assert _sent("a") == [{"peers": {vni: [{"address": "198.51.100.2", "port": 4791}]}, "complete": False}]
    assert _sent("c") == []
