"""Migration requests: validate, pick and reserve the destination, record the request as ``queued``."""

from django.contrib.auth.models import User
from django.db import IntegrityError, transaction

from apps.core.errors import Conflict, InvalidInput, InvalidState
from apps.vms import scheduler
from apps.vms.choices import NodeStatus, VMState
from apps.vms.models import VM, Node

from .choices import MigrationMode
from .models import Migration

_MIGRATABLE = {
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
    """Record a migration of ``vm`` with the destination's capacity reserved for its duration."""
    vm = VM.objects.select_for_update(of=("self",)).select_related("node").get(pk=vm.pk)
    if vm.state not in _MIGRATABLE[mode]:
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
    demand = scheduler.Demand(vm.vcpus, vm.memory_mb, vm.disk_gb)
    (dest,) = scheduler.reserve(demands=[demand], pinned=[dest_node], exclude={source.pk})
    assert dest is not None
    try:
        with transaction.atomic():
            return Migration.objects.create(
                vm=vm,
                source_node=source,
                dest_node=dest,
                mode=mode,
                requested_by=requested_by,
                bandwidth_limit_mbps=bandwidth_limit_mbps,
            )
    except IntegrityError as exc:
        raise Conflict(f"VM {vm.name} is already being migrated.") from exc
