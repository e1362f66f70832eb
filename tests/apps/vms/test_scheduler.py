"""Writes under concurrency (real PostgreSQL): placement never overcommits a node, quotas and names hold."""

import threading
from collections import Counter
from typing import Any

import pytest
from django.db import connection

from apps.core.context import Viewer
from apps.core.errors import NoCapacity
from apps.projects.services import personal_project
from apps.vms import scheduler
from apps.vms.models import VM, Node
from apps.vms.services import VMRequest, node_register, vm_create
from tests.conftest import set_quota


def _wait_for_a_lock_wait() -> None:
    """Until a transaction of this database waits for a lock (the test's second reservation)."""
    with connection.cursor() as cursor:
        for _ in range(500):
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
            )
            if cursor.fetchone()[0]:
                return
            threading.Event().wait(0.01)
    raise AssertionError("the second reservation never waited for the lock")


@pytest.mark.django_db(transaction=True)
def test_concurrent_creates_never_overcommit(make_user, make_node, make_image):
    # Room for exactly 5 VMs of 2 vCPUs on each of two nodes; 24 threads race for it.
    make_node("a", vcpus=10, memory_mb=100_000, disk_gb=1000)
    make_node("b", vcpus=10, memory_mb=100_000, disk_gb=1000)
    image = make_image()
    users = [make_user(f"racer{i}") for i in range(24)]
    outcomes: Counter[str] = Counter()
    barrier = threading.Barrier(len(users))
    lock = threading.Lock()

    def create(user) -> None:
        try:
            barrier.wait()
            vm_create(
                owner=user,
                project_id=personal_project(user).pk,
                request=VMRequest(name="vm", image=image, vcpus=2, memory_mb=512, disk_gb=10),
            )
            result = "created"
        except NoCapacity:
            result = "no_capacity"
        finally:
            connection.close()
        with lock:
            outcomes[result] += 1

    threads = [threading.Thread(target=create, args=(user,)) for user in users]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert outcomes == {"created": 10, "no_capacity": 14}
    for node in Node.objects.all():
        assert node.allocated_vcpus == 10
        assert node.allocated_vcpus == sum(VM.objects.filter(node=node).values_list("vcpus", flat=True))


@pytest.mark.django_db(transaction=True)
def test_concurrent_creates_of_one_user_respect_the_quota(make_user, make_node, make_image):
    from apps.core.errors import QuotaExceeded

    make_node("a", vcpus=1000, memory_mb=1_000_000, disk_gb=100_000)
    image = make_image()
    owner = make_user("greedy")
    set_quota(owner, max_vms=3, max_vcpus=100, max_memory_mb=100_000)
    project_id = personal_project(owner).pk
    barrier = threading.Barrier(12)
    results: list[str] = []

    def create(index: int) -> None:
        try:
            barrier.wait()
            vm_create(
                owner=owner,
                project_id=project_id,
                request=VMRequest(name=f"vm{index}", image=image, vcpus=1, memory_mb=64, disk_gb=1),
            )
            results.append("created")
        except QuotaExceeded:
            results.append("quota")
        finally:
            connection.close()

    threads = [threading.Thread(target=create, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(results) == ["created"] * 3 + ["quota"] * 9
    assert VM.objects.filter(owner=owner).count() == 3


def test_database_refuses_an_overcommitted_node(make_node):
    from django.db import IntegrityError, transaction

    node = make_node("c", vcpus=4)
    with pytest.raises(IntegrityError), transaction.atomic():
        Node.objects.filter(pk=node.pk).update(allocated_vcpus=5)


@pytest.mark.django_db(transaction=True)
def test_one_vm_skips_a_node_another_reservation_holds_and_takes_the_next_best(make_node):
    from django.db import connections, transaction

    from apps.vms import scheduler

    roomy = make_node("roomy", vcpus=10, memory_mb=200_000, disk_gb=1000)
    other = make_node("other", vcpus=10, memory_mb=100_000, disk_gb=1000)
    placed: list[Node | None] = []

    def second() -> None:  # "roomy" has the room and the most free memory, but is being reserved on
        with transaction.atomic():
            placed.extend(scheduler.reserve(demands=[scheduler.Demand(2, 1000, 10)]))
        connections.close_all()

    with transaction.atomic():
        (first,) = scheduler.reserve(demands=[scheduler.Demand(2, 1000, 10)])
        assert first is not None and first.pk == roomy.pk
        thread = threading.Thread(target=second)
        thread.start()
        thread.join(timeout=30)  # done while the first reservation still holds roomy: no waiting
        assert [node.pk for node in placed if node is not None] == [other.pk]
    assert Node.objects.get(pk=other.pk).allocated_vcpus == 2
    assert Node.objects.get(pk=roomy.pk).allocated_vcpus == 2


@pytest.mark.django_db(transaction=True)
def test_a_plan_made_stale_by_a_concurrent_reservation_is_placed_again_under_lock(make_node):
    """The only node with room is held by another reservation, which then takes the room: the
    second waits for it (the locked path), finds the room gone and places on the node left."""
    from django.db import connections, transaction

    from apps.vms import scheduler

    roomy = make_node("roomy", vcpus=10, memory_mb=200_000, disk_gb=1000)
    other = make_node("other", vcpus=1, memory_mb=100_000, disk_gb=1000)
    placed: list[Node | None] = []

    def second() -> None:
        with transaction.atomic():
            placed.extend(scheduler.reserve(demands=[scheduler.Demand(2, 1000, 10)]))
        connections.close_all()

    with transaction.atomic():
        (first,) = scheduler.reserve(demands=[scheduler.Demand(8, 1000, 10)])
        assert first is not None and first.pk == roomy.pk  # roomy keeps room for 2 vCPUs for now
        thread = threading.Thread(target=second)
        thread.start()
        _wait_for_a_lock_wait()  # roomy is the only node with 2 free vCPUs: the second waits for it
        Node.objects.filter(pk=other.pk).update(vcpus=4)  # room elsewhere, committed with ...
        scheduler.reserve(demands=[scheduler.Demand(2, 1000, 10)], pinned=[roomy])  # ... roomy full
    thread.join(timeout=30)
    assert [node.pk for node in placed if node is not None] == [other.pk]
    assert Node.objects.get(pk=other.pk).allocated_vcpus == 2
    assert Node.objects.get(pk=roomy.pk).allocated_vcpus == 10


@pytest.mark.django_db(transaction=True)
def test_a_plan_on_two_nodes_gone_stale_on_one_is_taken_back_whole(make_node):
    """The first node's conditional update succeeded, the second's found its room gone: the savepoint
    gives the first back before every node is locked and the demands are placed again."""
    from django.db import connections, transaction

    from apps.vms import scheduler

    roomy = make_node("roomy", vcpus=10, memory_mb=200_000, disk_gb=1000)
    other = make_node("other", vcpus=4, memory_mb=150_000, disk_gb=1000)
    placed: list[Node | None] = []

    def second() -> None:  # plans one demand on each node, then finds "other" full
        with transaction.atomic():
            placed.extend(scheduler.reserve(demands=[scheduler.Demand(2, 60_000, 10)] * 2))
        connections.close_all()

    with transaction.atomic():
        scheduler.reserve(demands=[scheduler.Demand(4, 1000, 10)], pinned=[other])  # every vCPU of "other"
        thread = threading.Thread(target=second)
        thread.start()
        _wait_for_a_lock_wait()  # the second reservation waits for other's row lock
    thread.join(timeout=30)
    assert [node.pk for node in placed if node is not None] == [roomy.pk, roomy.pk]
    assert Node.objects.get(pk=roomy.pk).allocated_vcpus == 4
    assert Node.objects.get(pk=roomy.pk).allocated_memory_mb == 120_000
    assert Node.objects.get(pk=other.pk).allocated_vcpus == 4


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("service", ["vm_update", "vm_rename"])
def test_concurrent_renames_to_one_name_leave_one_vm_with_it(service, make_user, make_node, make_image):
    """A rename takes no owner lock: the partial unique index refuses the second (409, or 400 from
    the one-statement rename), or vm_update's name check sees the first committed (400); never two
    live VMs with one name."""
    from apps.core.errors import Conflict, InvalidInput
    from apps.vms.services import VMChanges, vm_rename, vm_update

    def renamed(vm: VM) -> None:
        if service == "vm_update":
            vm_update(vm=vm, changes=VMChanges(name="same"))
        else:
            viewer = Viewer(user_id=owner.pk, is_staff=False, project_id=vm.project_id)
            assert vm_rename(viewer=viewer, vm_id=vm.pk, name="same") is not None

    make_node("a", vcpus=100, memory_mb=100_000, disk_gb=1000)
    image = make_image()
    owner = make_user("renamer")
    vms = [
        vm_create(
            owner=owner,
            project_id=personal_project(owner).pk,
            request=VMRequest(name=f"vm{i}", image=image, vcpus=1, memory_mb=64, disk_gb=1),
        )
        for i in range(8)
    ]
    barrier = threading.Barrier(len(vms))
    results: list[str] = []

    def rename(vm: VM) -> None:
        try:
            barrier.wait()
            renamed(vm)
            results.append("renamed")
        except Conflict:
            results.append("conflict")
        except InvalidInput:
            results.append("taken")
        finally:
            connection.close()

    threads = [threading.Thread(target=rename, args=(vm,)) for vm in vms]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results.count("renamed") == 1
    assert len(results) == len(vms)
    assert VM.objects.filter(owner=owner, name="same").count() == 1


@pytest.mark.django_db
def test_vms_with_nics_go_only_to_nodes_that_can_attach_them(user, image, make_node) -> None:
    old = node_register(
        name="old", address="h", dwcp_address="h:1", vcpus=16, memory_mb=32768, disk_gb=500, hypervisor={}
    )
    assert "did not say whether it can attach NICs" in old.networking  # an older worker
    project_id = personal_project(user).pk

    def create(name: str, **extra: Any) -> VM:
        request = VMRequest(name=name, image=image, vcpus=1, memory_mb=64, disk_gb=1, **extra)
        return vm_create(owner=user, project_id=project_id, request=request)

    with pytest.raises(NoCapacity, match=r"No node that can attach NICs has room .*networks: \[\]"):
        create("vm")
    with pytest.raises(NoCapacity, match=r"Node old cannot attach NICs .*networks: \[\]"):
        create("vm", node=old)
    assert create("bare", networks=[]).node == old
    able = make_node("able")
    assert create("vm").node == able
    assert scheduler.reserve(demands=[scheduler.Demand(1, 64, 1, networked=True)], pinned=[able]) == [able]
