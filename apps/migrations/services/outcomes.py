"""How a migration ends: completed (the VM is recorded on the destination) or rolled back (failed or
cancelled: the VM stays on its source, the destination's reservation is released and its copy removed).

Callers hold the migration's row lock; both ends take the VM's row lock, release one node's capacity
and send the nodes their last tasks after commit.
"""

from django.db import transaction
from django.utils import timezone

from apps.vms import cache as vm_cache
from apps.vms import scheduler
from apps.vms.choices import VMState
from apps.vms.models import VM
from apps.vms.services.vms import vm_demand
from workers import contract

from .. import progress
from ..choices import MigrationMode, MigrationStatus
from ..models import Migration
from . import node_tasks
from .drain import node_drain_progress
from .requests import schedule_soon
from .state import note, redis_client, transition


def complete(migration: Migration, actor: str, detail: str) -> None:
    """The destination runs (or holds) the VM: record it there and clean the source."""
    vm = VM.objects.select_for_update(of=("self",)).get(pk=migration.vm_id)
    source = migration.source_node
    scheduler.release(node_id=source.pk, demand=vm_demand(vm))
    vm.node = migration.dest_node
    started = migration.mode == MigrationMode.LIVE or migration.vm_state_before == VMState.RUNNING
    vm.state = VMState.RUNNING if started else VMState.STOPPED
    vm.state_reason = ""
    vm.save(update_fields=["node", "state", "state_reason", "updated_at"])
    vm_cache.vms_changed([vm])
    final = progress.read(redis_client(), str(migration.pk))
    migration.stats = {**migration.stats, **{key: value for key, value in final.items() if key != "updated"}}
    if migration.started_at:
        migration.stats["total_seconds"] = round((timezone.now() - migration.started_at).total_seconds(), 3)
    migration.percent = 100.0
    transition(
        migration,
        MigrationStatus.COMPLETED,
        actor=actor,
        detail=detail or f"now on {migration.dest_node.name}",
    )
    node_tasks.send_cleanup(migration)
    node_drain_progress(node_id=source.pk)
    transaction.on_commit(schedule_soon)


def roll_back(
    migration: Migration,
    to: MigrationStatus,
    *,
    actor: str,
    detail: str,
    cause: contract.FailureCause = "error",
) -> None:
    """Fail or cancel: the VM stays where it was, the destination is released and cleaned."""
    was = MigrationStatus(migration.status)
    transition(migration, to, actor=actor, detail=detail)
    failed = to == MigrationStatus.FAILED
    migration.error = detail if failed else ""
    migration.error_cause = cause if failed else ""
    migration.save(update_fields=["error", "error_cause"])
    vm = VM.objects.select_for_update(of=("self",)).get(pk=migration.vm_id)
    scheduler.release(node_id=migration.dest_node_id, demand=vm_demand(vm))
    if vm.state == VMState.MIGRATING:
        vm.state = migration.vm_state_before or VMState.RUNNING
        vm.state_reason = f"Migration {to}: {detail}"[:1000] if failed else ""
        vm.save(update_fields=["state", "state_reason", "updated_at"])
        vm_cache.vms_changed([vm])
    if was != MigrationStatus.QUEUED:
        progress.set_control(redis_client(), str(migration.pk), cancel=True)
        node_tasks.send_abort(migration, "dest")
        node_tasks.send_abort(migration, "source")
    transaction.on_commit(schedule_soon)


def late_failure(migration: Migration, *, actor: str, detail: str, cause: contract.FailureCause) -> None:
    """A failure reported after the migration ended: kept in the history; the error when it says more.

    The other side's report of the same failure can arrive first (the source resuming on the
    destination's memory-check verdict, sent before the destination's own report with the count of
    differing MiB): what an operator reads must not depend on that order.
    """
    note(migration, f"failed ({cause}): {detail}", actor=actor)
    if migration.status != MigrationStatus.FAILED or not _outranks(cause, migration.error_cause):
        return
    previous = f"Migration {MigrationStatus.FAILED}: {migration.error}"[:1000]
    migration.error, migration.error_cause = detail, cause
    migration.save(update_fields=["error", "error_cause"])
    VM.objects.filter(pk=migration.vm_id, state_reason=previous).update(
        state_reason=f"Migration {MigrationStatus.FAILED}: {detail}"[:1000]
    )


def _outranks(cause: str, current: str) -> bool:
    """Whether a failure of ``cause`` says more than the recorded one (an unranked cause ranks lowest)."""
    ranks: dict[str, int] = {name: rank for rank, name in enumerate(contract.FAILURE_CAUSES)}
    return ranks.get(cause, -1) > ranks.get(current, -1)
