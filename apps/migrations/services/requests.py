"""Requesting a migration: checked against the VM's state, recorded ``queued`` with the destination's
capacity reserved; the scheduler starts it within the per-node limits (``scheduling``)."""

import dataclasses

from django.contrib.auth.models import User
from django.db import IntegrityError, transaction

from apps.core.conf import novacron_setting
from apps.core.errors import Conflict, InvalidInput, InvalidState
from apps.networks import peers
from apps.vms import cache as vm_cache
from apps.vms import scheduler
from apps.vms.choices import NodeStatus, VMState
from apps.vms.models import VM, Node
from apps.vms.services.vms import vm_demand

from ..choices import MigrationMode, MigrationStatus, OnNoConvergence
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
    on_no_convergence: OnNoConvergence | None = None,
    force_complete_after_passes: int | None = None,
) -> Migration:
    """Record a migration of ``vm`` as ``queued`` with the destination's capacity reserved.

    ``on_no_convergence`` (and its passes) default to ``MIGRATION_ON_NO_CONVERGENCE``.
    """
    policy, passes = no_convergence_policy(on_no_convergence, force_complete_after_passes)
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
                on_no_convergence=policy,
                force_complete_after_passes=passes,
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


def no_convergence_policy(
    policy: OnNoConvergence | None, passes: int | None
) -> tuple[OnNoConvergence, int | None]:
    """A request's policy, the setting's where it names none; passes only with force_complete_after."""
    if policy is None:
        name, _, default_passes = str(novacron_setting("MIGRATION_ON_NO_CONVERGENCE")).partition(":")
        policy = OnNoConvergence(name)
        if passes is None and default_passes:
            passes = int(default_passes)
    if policy != OnNoConvergence.FORCE_COMPLETE_AFTER:
        if passes is not None:
            raise InvalidInput(
                "force_complete_after_passes applies only to on_no_convergence force_complete_after.",
                fields={"force_complete_after_passes": ["Only with on_no_convergence force_complete_after."]},
            )
        return policy, None
    if passes is None:
        raise InvalidInput(
            "on_no_convergence force_complete_after needs force_complete_after_passes.",
            fields={"force_complete_after_passes": ["Give the RAM pass from which to force (1 or more)."]},
        )
    return policy, passes


def schedule_soon() -> None:
    """Run the scheduler in the control worker (after a request, or once a migration ended)."""
    from ..tasks import migrations_schedule  # noqa: PLC0415 - tasks import services

    migrations_schedule.delay()
