"""Requesting a migration: checked against the VM's state, recorded ``queued`` with the destination's
capacity reserved; the scheduler starts it within the per-node limits (``scheduling``)."""

import dataclasses

from django.contrib.auth.models import User
from django.db import IntegrityError, transaction

from apps.core.errors import Conflict, InvalidInput, InvalidState
from apps.networks import peers
from apps.vms import cache as vm_cache
from apps.vms import scheduler
from apps.vms.choices import NodeStatus, VMState
from apps.vms.models import VM, Node
from apps.vms.services.vms import vm_demand

from ..choices import MigrationMode, MigrationStatus
from ..models import Migration, MigrationEvent

# The VM states each mode moves: a live migration needs a running guest.
MIGRATABLE = {
    MigrationMode.LIVE: frozenset({VMState.RUNNING}),
    MigrationMode.COLD: frozenset({VMState.RUNNING, VMState.STOPPED}),
}


@transaction.atomic
def migration_request(
    *,
    vm: VM,
    requested_by: User,
    mode: MigrationMode,
    dest_node: Node | None = None,
    bandwidth_limit_mbps: int | None = None,
) -> Migration:
    """Record a migration of ``vm`` as ``queued`` with the destination's capacity reserved."""
    vm = VM.objects.select_for_update(of=("self",)).select_related("node").get(pk=vm.pk)
    if vm.state == VMState.MIGRATING:
        raise Conflict(f"VM {vm.name} is already being migrated.")
    if vm.state not in MIGRATABLE[mode]:
        raise InvalidState(f"Cannot {mode}-migrate VM {vm.name}: it is {vm.state}.")
    if vm.pending_action:
        raise InvalidState(f"Cannot migrate VM {vm.name}: a {vm.pending_action} is still in progress.")
    source = vm.node
    if source is None:
        raise InvalidState(f"Cannot migrate VM {vm.name}: it is on no node.")
    if dest_node is not None and dest_node.pk == source.pk:
        raise InvalidInput(
            "The destination is the VM's current node.", fields={"dest_node": ["Pick another node."]}
        )
    if dest_node is not None and dest_node.status != NodeStatus.UP:
        raise InvalidState(f"Node {dest_node.name} is {dest_node.status}: it takes no migrations.")
    # A VM with NICs goes only to a node that can attach them.
    demand = dataclasses.replace(vm_demand(vm), networked=vm.nics.exists())
    (dest,) = scheduler.reserve(demands=[demand], pinned=[dest_node], exclude={source.pk})
    assert dest is not None
    try:
        with transaction.atomic():
            migration = Migration.objects.create(
                vm=vm,
                source_node=source,
                dest_node=dest,
                mode=mode,
                requested_by=requested_by,
                bandwidth_limit_mbps=bandwidth_limit_mbps,
                vm_state_before=vm.state,
            )
    except IntegrityError as exc:
        raise Conflict(f"VM {vm.name} is already being migrated.") from exc
    MigrationEvent.objects.create(
        migration=migration,
        actor=requested_by.get_username(),
        to_status=MigrationStatus.QUEUED,
        detail=f"{mode} migration from {source.name} to {dest.name} requested",
    )
    vm.state = VMState.MIGRATING
    vm.save(update_fields=["state", "updated_at"])
    vm_cache.vms_changed([vm])
    peers.sync_on_commit(vm_ids=[vm.pk])  # the destination joins the VM's networks' overlays
    transaction.on_commit(schedule_soon)
    return migration


def schedule_soon() -> None:
    """Run the scheduler in the control worker (after a request, or once a migration ended)."""
    from ..tasks import migrations_schedule  # noqa: PLC0415 - tasks import services

    migrations_schedule.delay()
