"""Copies a migration left behind, found in heartbeats and cleaned again (real PostgreSQL and Redis).

A migration's last message to a node can be lost with Redis; the node's heartbeat keeps listing the
copy, and the control side sends that message again once the grace period has passed.
"""

import base64
import json
import time
from datetime import timedelta
from typing import Any

import pytest
import redis
from django.conf import settings
from django.utils import timezone

from apps.migrations import services
from apps.migrations.choices import MigrationMode
from apps.migrations.models import Migration, MigrationEvent
from apps.vms.models import VM, Node
from apps.vms.services import nodes_check_heartbeats
from tests.conftest import vm_payload
from workers import contract

pytestmark = pytest.mark.django_db(transaction=True)

# Node names of their own: queues and heartbeat keys live in a Redis other test sessions share.
SOURCE, DEST = "leftover-src", "leftover-dst"
PAST_GRACE = timedelta(seconds=services.MIGRATION_LEFTOVER_GRACE_SECONDS + 5)


@pytest.fixture
def client():
    client = redis.Redis.from_url(settings.REDIS_URL)
    queues = [contract.node_queue(SOURCE), contract.node_queue(DEST)]
    client.delete(*queues)
    yield client
    client.delete(*queues, *(contract.HEARTBEAT_KEY.format(name=name) for name in (SOURCE, DEST)))


@pytest.fixture
def running_vm(api, make_node, image):
    make_node(SOURCE)
    make_node(DEST)
    vm_id = api.post("/api/v1/vms/", vm_payload(node=SOURCE), format="json").json()["id"]
    VM.objects.filter(pk=vm_id).update(state="running")
    return VM.objects.get(pk=vm_id)


def queued(client: redis.Redis, queue: str) -> list[tuple[str, dict[str, Any]]]:
    """The tasks waiting in a Celery queue on ``client``: (name, kwargs)."""
    tasks = []
    for raw in client.lrange(queue, 0, -1):
        message = json.loads(raw)
        _args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        tasks.append((message["headers"]["task"], kwargs))
    return tasks


def _sent(client: redis.Redis, node: str) -> list[tuple[str, dict[str, Any]]]:
    """The tasks waiting in ``node``'s queue: (name, kwargs)."""
    return queued(client, contract.node_queue(node))


def _beat(client: redis.Redis, holdings: dict[str, list[VM]]) -> None:
    """Each node's heartbeat lists the VMs it holds, then the control side folds them in."""
    for node, vms in holdings.items():
        payload = {"ts": time.time(), "vms": [{"id": str(vm.pk), "state": "running"} for vm in vms]}
        client.set(contract.HEARTBEAT_KEY.format(name=node), json.dumps(payload), ex=60)
    nodes_check_heartbeats(client=client)


def _migrate(vm: VM, user: Any) -> Migration:
    """A live migration from SOURCE to DEST, up to the destination ready and the source transferring."""
    migration = services.migration_request(
        vm=vm, requested_by=user, mode=MigrationMode.LIVE, dest_node=Node.objects.get(name=DEST)
    )
    assert services.migrations_schedule() == [str(migration.pk)]
    targets = {"disk": f"{vm.pk}/nbd.sock", "memory": f"{vm.pk}/incoming.sock"}
    services.migration_report(
        migration_id=str(migration.pk), node=DEST, role="dest", event="prepared", targets=targets
    )
    return migration


def _complete(migration: Migration) -> None:
    services.migration_report(migration_id=str(migration.pk), node=DEST, role="dest", event="switched")
    assert Migration.objects.get(pk=migration.pk).status == "completed"


def _ended_long_ago(migration: Migration) -> None:
    Migration.objects.filter(pk=migration.pk).update(finished_at=timezone.now() - PAST_GRACE)


def test_a_lost_source_cleanup_is_sent_again_once_the_grace_period_has_passed(client, running_vm, user):
    migration = _migrate(running_vm, user)
    _complete(migration)
    client.delete(contract.node_queue(SOURCE), contract.node_queue(DEST))  # the cleanup is lost

    _beat(client, {SOURCE: [running_vm], DEST: [running_vm]})
    assert _sent(client, SOURCE) == []  # within the grace period the normal cleanup may still arrive

    _ended_long_ago(migration)
    _beat(client, {SOURCE: [running_vm], DEST: [running_vm]})
    ((task, kwargs),) = _sent(client, SOURCE)
    assert task == contract.NODE_MIGRATION_CLEANUP
    assert kwargs["migration_id"] == str(migration.pk) and kwargs["vm"]["id"] == str(running_vm.pk)
    assert _sent(client, DEST) == []  # the record's home is never touched
    vm = VM.objects.select_related("node").get(pk=running_vm.pk)
    assert (vm.node.name, vm.state) == (DEST, "running")
    (event,) = MigrationEvent.objects.filter(migration=migration, actor="reconciler")
    assert event.to_status == "completed" and SOURCE in event.detail and "sent again" in event.detail

    # The next heartbeats, while the re-sent cleanup is on its way, send nothing more.
    _beat(client, {SOURCE: [running_vm], DEST: [running_vm]})
    assert len(_sent(client, SOURCE)) == 1


def test_a_copy_that_stays_gets_a_bounded_number_of_resends(client, running_vm, user, caplog):
    migration = _migrate(running_vm, user)
    _complete(migration)
    _ended_long_ago(migration)
    client.delete(contract.node_queue(SOURCE))
    for _ in range(services.MIGRATION_LEFTOVER_MAX_RESENDS + 2):
        MigrationEvent.objects.filter(migration=migration, actor="reconciler").update(
            at=timezone.now() - PAST_GRACE
        )
        _beat(client, {SOURCE: [running_vm]})
    assert len(_sent(client, SOURCE)) == services.MIGRATION_LEFTOVER_MAX_RESENDS
    last = MigrationEvent.objects.filter(migration=migration, actor="reconciler").order_by("at", "id").last()
    assert last is not None and "by hand" in last.detail
    assert f"node {SOURCE} holds a copy: the source cleanup of migration {migration.pk} was sent again" in (
        caplog.text
    )


def test_nothing_is_sent_while_a_migration_involving_the_node_is_in_flight(client, running_vm, user):
    first = _migrate(running_vm, user)
    _complete(first)
    _ended_long_ago(first)
    # On its way back to the source: the source's copy belongs to this migration now.
    back = services.migration_request(
        vm=VM.objects.get(pk=running_vm.pk),
        requested_by=user,
        mode=MigrationMode.LIVE,
        dest_node=Node.objects.get(name=SOURCE),
    )
    client.delete(contract.node_queue(SOURCE), contract.node_queue(DEST))
    for status in ("queued", "preparing", "transferring", "switching"):
        Migration.objects.filter(pk=back.pk).update(status=status)
        _beat(client, {SOURCE: [running_vm]})
        assert _sent(client, SOURCE) == [], status
    assert not MigrationEvent.objects.filter(actor="reconciler").exists()


def test_the_destination_copy_of_a_failed_migration_gets_its_abort_again(client, running_vm, user):
    migration = _migrate(running_vm, user)
    services.migration_report(
        migration_id=str(migration.pk), node=SOURCE, role="source", event="failed", detail="link down"
    )
    assert Migration.objects.get(pk=migration.pk).status == "failed"
    client.delete(contract.node_queue(SOURCE), contract.node_queue(DEST))  # both aborts are lost
    _ended_long_ago(migration)

    _beat(client, {SOURCE: [running_vm], DEST: [running_vm]})
    ((task, kwargs),) = _sent(client, DEST)
    assert task == contract.NODE_MIGRATION_ABORT
    assert (kwargs["migration_id"], kwargs["role"]) == (str(migration.pk), "dest")
    assert _sent(client, SOURCE) == []  # the VM's home, where it still runs
    vm = VM.objects.select_related("node").get(pk=running_vm.pk)
    assert (vm.node.name, vm.state) == (SOURCE, "running")


def test_a_half_made_cold_copy_without_a_definition_gets_its_abort_again(client, running_vm, user):
    migration = services.migration_request(
        vm=running_vm, requested_by=user, mode=MigrationMode.COLD, dest_node=Node.objects.get(name=DEST)
    )
    services.migrations_schedule()
    services.migration_report(
        migration_id=str(migration.pk), node=DEST, role="dest", event="prepared", targets={"disk": "d"}
    )
    services.migration_report(
        migration_id=str(migration.pk), node=DEST, role="dest", event="failed", detail="disk full"
    )
    client.delete(contract.node_queue(SOURCE), contract.node_queue(DEST))
    _ended_long_ago(migration)

    # The destination holds only the marker and the partial disk: listed apart from defined VMs.
    payload = {"ts": time.time(), "vms": [], "partial": [str(running_vm.pk)]}
    client.set(contract.HEARTBEAT_KEY.format(name=DEST), json.dumps(payload), ex=60)
    nodes_check_heartbeats(client=client)
    ((task, kwargs),) = _sent(client, DEST)
    assert (task, kwargs["role"]) == (contract.NODE_MIGRATION_ABORT, "dest")


def test_a_migration_cancelled_while_queued_never_explains_a_copy(client, running_vm, user, caplog):
    migration = services.migration_request(
        vm=running_vm, requested_by=user, mode=MigrationMode.LIVE, dest_node=Node.objects.get(name=DEST)
    )
    services.migration_cancel(migration=migration, actor="alice")
    _ended_long_ago(migration)
    client.delete(contract.node_queue(SOURCE), contract.node_queue(DEST))

    _beat(client, {SOURCE: [running_vm], DEST: [running_vm]})
    assert _sent(client, DEST) == [] and _sent(client, SOURCE) == []
    assert f"node {DEST} holds a copy: no started migration involved this node" in caplog.text


def _copy(migration: Migration) -> contract.MigrationCopy:
    return {"migration_id": str(migration.pk), "vm_id": str(migration.vm_id), "role": "dest"}


def test_a_starting_node_is_told_which_destination_copies_are_leftovers(
    client, api, running_vm, make_node, user
):
    failed = _migrate(running_vm, user)
    services.migration_report(
        migration_id=str(failed.pk), node=SOURCE, role="source", event="failed", detail="link down"
    )
    other_id = api.post("/api/v1/vms/", vm_payload(name="web-2", node=SOURCE), format="json").json()["id"]
    VM.objects.filter(pk=other_id).update(state="running")
    active = _migrate(VM.objects.get(pk=other_id), user)
    client.delete(contract.node_queue(SOURCE), contract.node_queue(DEST))
    gone: contract.MigrationCopy = {
        "migration_id": "6f1c0a52-0000-4000-8000-000000000001",  # deleted with its VM
        "vm_id": "6f1c0a52-0000-4000-8000-000000000002",
        "role": "dest",
    }
    source_copy: contract.MigrationCopy = {**_copy(failed), "role": "source"}
    copies = [_copy(failed), _copy(active), gone, source_copy]
    assert services.node_migration_copies(node=DEST, copies=copies) == [str(failed.pk), gone["migration_id"]]
    ((task, kwargs),) = _sent(client, DEST)
    assert (task, kwargs) == (contract.NODE_MIGRATION_LEFTOVERS, {"ended": [_copy(failed), gone]})
    assert _sent(client, SOURCE) == []
    assert MigrationEvent.objects.filter(migration=failed, detail__contains="asked to remove it").exists()
    # The node kept that copy (its guest ran there): the heartbeats do not send its abort again either.
    client.delete(contract.node_queue(DEST))
    services.migration_report(
        migration_id=str(failed.pk), node=DEST, role="dest", event="kept", detail="its QEMU is running"
    )
    _ended_long_ago(failed)
    _beat(client, {SOURCE: [running_vm], DEST: [running_vm]})
    assert _sent(client, DEST) == []
    # Another node listing the same copies is told nothing: they are not its migrations' copies.
    assert services.node_migration_copies(node=SOURCE, copies=[_copy(failed)]) == []
    # Completed: the destination copy is the VM now, whatever marker is left.
    services.migration_report(migration_id=str(active.pk), node=DEST, role="dest", event="switched")
    assert services.node_migration_copies(node=DEST, copies=[_copy(active)]) == []
