"""IPAM and NICs on the real PostgreSQL: addresses handed out once under concurrent creates (threads
with their own connections), lowest first, freed on delete; the default network made once; the
400s of unknown networks and the 409 of a full one."""

import ipaddress
import threading
from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection

from apps.core.errors import InvalidInput, NoAddress
from apps.networks import addresses
from apps.networks.models import Network, Nic
from apps.networks.nics import nic_descriptions, nics_shown, vm_nics
from apps.networks.services import network_create
from apps.projects.models import Membership, Project, Role
from apps.projects.services import personal_project
from apps.vms.models import VM
from apps.vms.services import VMRequest, vm_batch_create, vm_create, vm_delete, vm_record_report

THREADS = 10


def _requests(image: Any, prefix: str, count: int, networks: list[str] | None) -> list[VMRequest]:
    return [
        VMRequest(name=f"{prefix}{i}", image=image, vcpus=1, memory_mb=64, disk_gb=1, networks=networks)
        for i in range(count)
    ]


def _race(count: int, work: Callable[[int], None]) -> list[BaseException]:
    """Run ``work(i)`` in ``count`` threads started together, each with its own connection."""
    barrier = threading.Barrier(count)
    failures: list[BaseException] = []

    def run(index: int) -> None:
        try:
            barrier.wait()
            work(index)
        except BaseException as exc:
            failures.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return failures


@pytest.mark.django_db(transaction=True)
def test_a_thousand_vms_of_ten_projects_get_distinct_addresses_of_one_22(
    make_user: Any, make_node: Any, make_image: Any
) -> None:
    for name in ("a", "b"):
        make_node(name, vcpus=10_000, memory_mb=10_000_000, disk_gb=100_000)
    image = make_image()
    owner = make_user("operator", staff=True)
    shared = network_create(
        project_id=personal_project(owner).pk, name="fabric", cidr="10.90.0.0/22", shared=True
    )
    teams = []
    for index in range(THREADS):
        user = make_user(f"user{index}")
        project = Project.objects.create(
            name=f"team{index}", max_vms=1000, max_vcpus=1000, max_memory_mb=10**7
        )
        Membership.objects.create(project=project, user=user, role=Role.MEMBER)
        teams.append((user, project))

    def create(index: int) -> None:
        user, project = teams[index]
        vm_batch_create(owner=user, project_id=project.pk, requests=_requests(image, "vm", 100, ["fabric"]))

    assert _race(THREADS, create) == []
    addresses = list(Nic.objects.filter(network=shared).values_list("ipv4", flat=True))
    assert len(addresses) == len(set(addresses)) == 1000
    subnet = ipaddress.IPv4Network("10.90.0.0/22")
    hosts = {str(host) for host in subnet.hosts()} - {"10.90.0.1"}
    assert set(addresses) <= hosts
    # The lowest first: the first 1000 hosts after the gateway, no gap.
    assert set(addresses) == {str(subnet.network_address + offset) for offset in range(2, 1002)}
    assert Nic.objects.values("mac").distinct().count() == 1000
    assert {vm.node.name for vm in VM.objects.select_related("node")} == {"a", "b"}
    user, project = teams[0]
    with pytest.raises(NoAddress, match=r"fabric \(10.90.0.0/22\) has 21 free address\(es\), 22 are needed"):
        vm_batch_create(owner=user, project_id=project.pk, requests=_requests(image, "more", 22, ["fabric"]))
    assert Nic.objects.count() == 1000 and VM.objects.count() == 1000


@pytest.mark.django_db(transaction=True)
def test_concurrent_first_creates_make_one_default_network(
    make_user: Any, make_node: Any, make_image: Any
) -> None:
    make_node("a", vcpus=1000, memory_mb=1_000_000, disk_gb=10_000)
    image = make_image()
    user = make_user("alice")
    project = personal_project(user)

    def create(index: int) -> None:
        vm_create(owner=user, project_id=project.pk, request=_requests(image, f"vm{index}-", 1, None)[0])

    assert _race(8, create) == []
    (network,) = Network.objects.all()
    assert (network.name, network.cidr, network.gateway) == ("default", "10.0.0.0/24", "10.0.0.1")
    addresses = sorted(Nic.objects.values_list("ipv4", flat=True), key=ipaddress.IPv4Address)
    assert addresses == [f"10.0.0.{host}" for host in range(2, 10)]


@pytest.mark.django_db
def test_a_hundred_vms_on_two_nodes_get_a_hundred_addresses(
    user: Any, make_node: Any, make_image: Any
) -> None:
    for name in ("a", "b"):
        make_node(name, vcpus=100, memory_mb=100_000, disk_gb=1000)
    image = make_image()
    project = personal_project(user)
    _, vms = vm_batch_create(owner=user, project_id=project.pk, requests=_requests(image, "vm", 100, None))
    nics = Nic.objects.filter(vm__in=vms)
    assert nics.values("ipv4").distinct().count() == 100 == nics.values("mac").distinct().count()
    assert {vm.node.name for vm in vms if vm.node} == {"a", "b"}


@pytest.mark.django_db
def test_a_deleted_vms_address_is_handed_out_again(user: Any, node: Any, make_image: Any) -> None:
    image = make_image()
    project = personal_project(user)
    first, second = (
        vm_create(owner=user, project_id=project.pk, request=request)
        for request in _requests(image, "vm", 2, None)
    )
    assert [nic.ipv4 for nic in Nic.objects.order_by("vm__name")] == ["10.0.0.2", "10.0.0.3"]
    vm_delete(vm=first)
    assert Nic.objects.filter(vm=first).exists()  # until its node deleted it
    vm_record_report(
        vm_id=str(first.pk), operation="delete", ok=True, state="deleted", reason="", node="node1"
    )
    assert not Nic.objects.filter(vm=first).exists()
    third = vm_create(owner=user, project_id=project.pk, request=_requests(image, "new", 1, None)[0])
    assert Nic.objects.get(vm=third).ipv4 == "10.0.0.2"
    assert Nic.objects.get(vm=second).ipv4 == "10.0.0.3"


@pytest.mark.django_db
def test_nics_follow_the_order_of_networks_by_name_or_id_and_none_is_none(
    user: Any, node: Any, make_image: Any
) -> None:
    image = make_image()
    project = personal_project(user)
    lan = network_create(project_id=project.pk, name="lan", cidr="10.1.0.0/24")
    network_create(project_id=project.pk, name="dmz", cidr="10.2.0.0/24")
    request = VMRequest(
        name="two", image=image, vcpus=1, memory_mb=64, disk_gb=1, networks=["dmz", str(lan.pk)]
    )
    vm = vm_create(owner=user, project_id=project.pk, request=request)
    nics = list(Nic.objects.filter(vm=vm).order_by("index").values_list("index", "network__name", "ipv4"))
    assert nics == [(0, "dmz", "10.2.0.2"), (1, "lan", "10.1.0.2")]
    bare = VMRequest(name="bare", image=image, vcpus=1, memory_mb=64, disk_gb=1, networks=[])
    assert not Nic.objects.filter(vm=vm_create(owner=user, project_id=project.pk, request=bare)).exists()
    assert not Network.objects.filter(name="default").exists()


@pytest.mark.django_db
def test_unknown_or_invisible_networks_are_400s_naming_them(
    user: Any, other_user: Any, make_image: Any
) -> None:
    image = make_image()
    theirs = network_create(project_id=personal_project(other_user).pk, name="theirs", cidr="10.3.0.0/24")
    project = personal_project(user)
    network_create(project_id=project.pk, name="mine", cidr="10.4.0.0/24")
    requests = _requests(image, "vm", 3, ["mine"])
    requests[2] = VMRequest(
        name="vm2", image=image, vcpus=1, memory_mb=64, disk_gb=1, networks=["mine", "theirs", str(theirs.pk)]
    )
    with pytest.raises(InvalidInput) as refused:
        vm_batch_create(owner=user, project_id=project.pk, requests=requests)
    assert refused.value.fields == {
        "vms[2].networks[1]": ["No network 'theirs' in this project or shared with it."],
        "vms[2].networks[2]": [f"No network '{theirs.pk}' in this project or shared with it."],
    }
    assert not VM.objects.exists() and not Nic.objects.exists()


@pytest.mark.django_db
def test_a_drawn_mac_already_taken_is_drawn_again_and_the_answer_shows_what_was_written(
    user: Any, node: Any, make_image: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = make_image()
    project = personal_project(user)
    first = vm_create(owner=user, project_id=project.pk, request=_requests(image, "a", 1, None)[0])
    taken = Nic.objects.get(vm=first).mac
    draws = iter([[taken, "52:54:00:00:00:02"], ["52:54:00:00:00:03"]])
    monkeypatch.setattr(addresses, "random_macs", lambda count, avoid=frozenset(): next(draws))
    _, (one, two) = vm_batch_create(
        owner=user, project_id=project.pk, requests=_requests(image, "b", 2, None)
    )
    assert nic_descriptions(one)[0]["mac"] == "52:54:00:00:00:03"  # the clash, drawn again
    assert nics_shown(two) == [{"network": "default", "mac": "52:54:00:00:00:02", "ipv4": "10.0.0.4"}]
    stored = dict(Nic.objects.filter(vm__in=[one, two]).values_list("vm__name", "mac"))
    assert stored == {"b0": "52:54:00:00:00:03", "b1": "52:54:00:00:00:02"}
    assert [nic.ipv4 for nic in vm_nics(VM.objects.get(pk=one.pk))] == ["10.0.0.3"]
