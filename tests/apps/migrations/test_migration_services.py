"""The migration state machine on the control side (real PostgreSQL and Redis; no node answers here)."""

import json
from typing import Any

import pytest
import redis
from django.conf import settings

from apps.core.errors import Conflict, InvalidState
from apps.migrations import services
from apps.migrations.choices import MigrationMode
from apps.migrations.models import Migration
from apps.vms.models import VM, Node
from tests.conftest import vm_payload
from workers import contract

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def running_vm(api, make_node, image):
    make_node("src")
    make_node("dst")
    vm_id = api.post("/api/v1/vms/", vm_payload(node="src"), format="json").json()["id"]
    VM.objects.filter(pk=vm_id).update(state="running")
    return VM.objects.get(pk=vm_id)


def _queued_tasks(queue: str) -> list[str]:
    client = redis.Redis.from_url(settings.REDIS_URL)
    return [json.loads(raw)["headers"]["task"] for raw in client.lrange(queue, 0, -1)]


def _clear(*queues: str) -> None:
    client = redis.Redis.from_url(settings.REDIS_URL)
    client.delete(*queues)


def _transferring(running_vm: VM, user: Any) -> Migration:
    """A live migration of ``running_vm`` to ``dst``, prepared there: transferring."""
    migration = services.migration_request(
        vm=running_vm, requested_by=user, mode=MigrationMode.LIVE, dest_node=Node.objects.get(name="dst")
    )
    services.migrations_schedule()
    targets = {"disk": f"{running_vm.pk}/nbd.sock", "memory": f"{running_vm.pk}/incoming.sock"}
    services.migration_report(
        migration_id=str(migration.pk), node="dst", role="dest", event="prepared", targets=targets
    )
    return Migration.objects.get(pk=migration.pk)


def test_request_reserves_the_destination_and_marks_the_vm(api, running_vm):
    body = api.post(f"/api/v1/vms/{running_vm.pk}/migrate/", {"dest_node": "dst"}, format="json").json()
    assert body["status"] == "queued" and body["percent"] == 0.0
    assert VM.objects.get(pk=running_vm.pk).state == "migrating"
    assert Node.objects.get(name="dst").allocated_vcpus == 2
    assert (
        api.post(f"/api/v1/vms/{running_vm.pk}/migrate/", {"dest_node": "dst"}, format="json").status_code
        == 409
    )
    assert api.post(f"/api/v1/vms/{running_vm.pk}/stop/").status_code == 409
    assert api.delete(f"/api/v1/vms/{running_vm.pk}/").status_code == 409


def test_cancel_while_queued_rolls_back_at_once(api, running_vm, user):
    migration = services.migration_request(
        vm=running_vm, requested_by=user, mode=MigrationMode.LIVE, dest_node=Node.objects.get(name="dst")
    )
    response = api.post(f"/api/v1/migrations/{migration.pk}/cancel/")
    assert response.status_code == 202 and response.json()["status"] == "cancelled"
    assert VM.objects.get(pk=running_vm.pk).state == "running"
    assert Node.objects.get(name="dst").allocated_vcpus == 0
    history = [
        event["to_status"] for event in api.get(f"/api/v1/migrations/{migration.pk}/").json()["history"]
    ]
    assert history == ["queued", "cancelled"]
    assert api.post(f"/api/v1/migrations/{migration.pk}/cancel/").status_code == 409


def test_cancel_while_preparing_aborts_the_destination(api, running_vm, user):
    _clear("node.src", "node.dst")
    migration = services.migration_request(
        vm=running_vm, requested_by=user, mode=MigrationMode.LIVE, dest_node=Node.objects.get(name="dst")
    )
    assert services.migrations_schedule() == [str(migration.pk)]
    assert Migration.objects.get(pk=migration.pk).status == "preparing"
    # Newest first: the destination learnt its overlay peers (when requested, then when preparing)
    # before its prepare.
    assert _queued_tasks("node.dst") == [
        "novacron.node.migration_prepare",
        "novacron.node.network_peers",
        "novacron.node.network_peers",
    ]
    services.migration_cancel(migration=migration, actor="alice")
    assert Migration.objects.get(pk=migration.pk).status == "cancelled"
    assert "novacron.node.migration_abort" in _queued_tasks("node.dst")
    assert "novacron.node.migration_abort" in _queued_tasks("node.src")
    # The destination's late "prepared" finds the migration over and changes nothing.
    services.migration_report(
        migration_id=str(migration.pk), node="dst", role="dest", event="prepared", targets={}
    )
    assert Migration.objects.get(pk=migration.pk).status == "cancelled"
    assert VM.objects.get(pk=running_vm.pk).node.name == "src"


def test_per_node_limits_keep_the_rest_queued_in_order(api, make_node, image, user, settings):
    settings.NOVACRON = {**settings.NOVACRON, "MIGRATION_MAX_OUTGOING": 1}
    make_node("src")
    make_node("dst")
    vms = []
    for index in range(3):
        vm_id = api.post("/api/v1/vms/", vm_payload(name=f"m{index}", node="src"), format="json").json()["id"]
        VM.objects.filter(pk=vm_id).update(state="running")
        vms.append(VM.objects.get(pk=vm_id))
    migrations = [
        services.migration_request(
            vm=vm, requested_by=user, mode=MigrationMode.LIVE, dest_node=Node.objects.get(name="dst")
        )
        for vm in vms
    ]
    assert services.migrations_schedule() == [str(migrations[0].pk)]
    assert services.migrations_schedule() == []
    services.migration_cancel(migration=migrations[0], actor="alice")
    assert services.migrations_schedule() == [str(migrations[1].pk)]
    assert Migration.objects.get(pk=migrations[2].pk).status == "queued"


def test_reports_from_the_wrong_node_are_ignored_and_switch_completes(api, running_vm, user):
    migration = services.migration_request(
        vm=running_vm, requested_by=user, mode=MigrationMode.LIVE, dest_node=Node.objects.get(name="dst")
    )
    services.migrations_schedule()
    services.migration_report(
        migration_id=str(migration.pk), node="src", role="dest", event="prepared", targets={}
    )
    assert Migration.objects.get(pk=migration.pk).status == "preparing"
    targets = {"disk": f"{running_vm.pk}/nbd.sock", "memory": f"{running_vm.pk}/incoming.sock"}
    services.migration_report(
        migration_id=str(migration.pk), node="dst", role="dest", event="prepared", targets=targets
    )
    assert Migration.objects.get(pk=migration.pk).status == "transferring"
    services.migration_report(
        migration_id=str(migration.pk), node="dst", role="dest", event="switched",
        stats={"dest_resumed_at": 100.25},
    )  # fmt: skip
    services.migration_report(
        migration_id=str(migration.pk), node="src", role="source", event="transferred",
        stats={"source_stopped_at": 100.2, "qemu_downtime_ms": 40},
    )  # fmt: skip
    migration = Migration.objects.get(pk=migration.pk)
    assert migration.status == "completed"
    assert migration.stats["guest_pause_ms"] == 50.0
    vm = VM.objects.get(pk=running_vm.pk)
    assert (vm.node.name, vm.state) == ("dst", "running")
    assert Node.objects.get(name="src").allocated_vcpus == 0
    assert Node.objects.get(name="dst").allocated_vcpus == 2
    assert api.get(f"/api/v1/migrations/{migration.pk}/").json()["downtime_ms"] == 50.0


def test_force_complete_and_bandwidth_need_a_running_transfer(api, running_vm, user):
    migration = services.migration_request(
        vm=running_vm, requested_by=user, mode=MigrationMode.LIVE, dest_node=Node.objects.get(name="dst")
    )
    with pytest.raises(InvalidState):
        services.migration_force_complete(migration=migration, actor="alice")
    assert api.post(f"/api/v1/migrations/{migration.pk}/force-complete/").status_code == 409
    response = api.patch(f"/api/v1/migrations/{migration.pk}/", {"bandwidth_limit_mbps": 0}, format="json")
    assert response.status_code == 400
    response = api.patch(f"/api/v1/migrations/{migration.pk}/", {"bandwidth_limit_mbps": 50}, format="json")
    assert response.status_code == 200 and response.json()["bandwidth_limit_mbps"] == 50
    control = redis.Redis.from_url(settings.REDIS_URL).hgetall(f"novacron:migration:{migration.pk}:control")
    assert control[b"bandwidth_limit_mbps"] == b"50"
    with pytest.raises(Conflict):
        services.migration_request(vm=running_vm, requested_by=user, mode=MigrationMode.COLD)


def test_force_complete_waits_for_the_memory_phase(api, running_vm, user):
    migration = _transferring(running_vm, user)
    services.migration_report(
        migration_id=str(migration.pk), node="src", role="source", event="phase", detail="disk"
    )
    response = api.post(f"/api/v1/migrations/{migration.pk}/force-complete/")
    assert response.status_code == 409
    assert "memory phase" in response.json()["error"]["message"]
    services.migration_report(
        migration_id=str(migration.pk), node="src", role="source", event="phase", detail="memory"
    )
    assert api.post(f"/api/v1/migrations/{migration.pk}/force-complete/").status_code == 202
    control = redis.Redis.from_url(settings.REDIS_URL).hgetall(f"novacron:migration:{migration.pk}:control")
    assert control[b"force_complete"] == b"1"


def test_an_ended_migration_leaves_no_keys_behind_in_redis(api, running_vm, user):
    client = redis.Redis.from_url(settings.REDIS_URL)
    migration = _transferring(running_vm, user)
    progress_key = f"novacron:migration:{migration.pk}:progress"
    control_key = f"novacron:migration:{migration.pk}:control"
    client.hset(progress_key, mapping={"percent": "60", "wire_bytes": "1000"})
    client.expire(progress_key, 7 * 24 * 3600)
    assert (
        api.patch(
            f"/api/v1/migrations/{migration.pk}/", {"bandwidth_limit_mbps": 50}, format="json"
        ).status_code
        == 200
    )
    assert client.exists(control_key)
    services.migration_report(
        migration_id=str(migration.pk), node="dst", role="dest", event="switched", stats={}
    )
    assert Migration.objects.get(pk=migration.pk).status == "completed"
    assert not client.exists(control_key)
    assert 0 < client.ttl(progress_key) <= 60
    # The source's last progress write can land after the switch; its final report drops it again.
    client.expire(progress_key, 7 * 24 * 3600)
    services.migration_report(
        migration_id=str(migration.pk),
        node="src",
        role="source",
        event="transferred",
        stats={"qemu_downtime_ms": 30},
    )
    assert 0 < client.ttl(progress_key) <= 60


MEASURED = (
    "MemoryMismatch: guest memory arrived different from the source's in 2 of 128 MiB although QEMU "
    "reported the migration complete"
)
RELAYED = "MemoryMismatch: the destination's memory check failed ...; the source resumed"


@pytest.mark.parametrize("order", ["destination first", "source first"])
def test_the_measured_memory_mismatch_is_the_error_whichever_report_comes_first(api, running_vm, user, order):
    migration = _transferring(running_vm, user)
    reports: list[tuple[str, contract.Role, str, contract.FailureCause]] = [
        ("dst", "dest", MEASURED, "measured"),
        ("src", "source", RELAYED, "relayed"),
    ]
    if order == "source first":
        reports.reverse()
    for node, role, detail, cause in reports:
        services.migration_report(
            migration_id=str(migration.pk), node=node, role=role, event="failed", detail=detail, cause=cause
        )
    migration = Migration.objects.get(pk=migration.pk)
    assert migration.status == "failed"
    assert migration.error == f"dest dst: {MEASURED}" and migration.error_cause == "measured"
    assert VM.objects.get(pk=running_vm.pk).state_reason == f"Migration failed: dest dst: {MEASURED}"
    history = " | ".join(migration.events.values_list("detail", flat=True))
    assert MEASURED in history and RELAYED in history


def test_a_later_failure_of_equal_rank_keeps_the_first_error(api, running_vm, user):
    migration = _transferring(running_vm, user)
    failures: list[tuple[str, contract.Role, str]] = [
        ("src", "source", "tunnel broke"),
        ("dst", "dest", "incoming failed"),
    ]
    for node, role, detail in failures:
        services.migration_report(
            migration_id=str(migration.pk), node=node, role=role, event="failed", detail=detail
        )
    migration = Migration.objects.get(pk=migration.pk)
    assert (migration.error, migration.error_cause) == ("source src: tunnel broke", "error")
    assert "failed (error): dest dst: incoming failed" in migration.events.values_list("detail", flat=True)
