"""What nodes report, applied to the recorded state by the control worker; every report is idempotent."""

import json
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from apps.core.conf import novacron_setting
from apps.vms import cache as vm_cache
from apps.vms import dispatch, scheduler
from apps.vms.choices import BatchItemStatus, BatchStatus, NodeStatus, VMAction, VMState
from apps.vms.models import VM, BatchItem, BatchOperation, Node
from workers import contract

from .vms import _finish_delete, vm_demand

logger = logging.getLogger(__name__)


def _finish_batch_items(vm: VM, ok: bool, reason: str) -> None:
    items = list(BatchItem.objects.filter(vm=vm, status=BatchItemStatus.PENDING).select_related("batch"))
    for item in items:
        item.status = BatchItemStatus.SUCCEEDED if ok else BatchItemStatus.FAILED
        item.error = "" if ok else reason[:1000]
        item.save(update_fields=["status", "error", "updated_at"])
    for batch_id in {item.batch_id for item in items}:
        batch_update_status(batch_id=batch_id)


def batch_update_status(*, batch_id: Any) -> None:
    """Close a batch once no item is pending (the group's completion callback)."""
    batch = BatchOperation.objects.select_for_update().get(pk=batch_id)
    if batch.status != BatchStatus.RUNNING:
        return
    statuses = list(batch.items.values_list("status", flat=True))
    if BatchItemStatus.PENDING in statuses:
        return
    failed = statuses.count(BatchItemStatus.FAILED)
    batch.status = (
        BatchStatus.COMPLETED
        if failed == 0
        else BatchStatus.FAILED
        if failed == len(statuses)
        else BatchStatus.PARTIAL
    )
    batch.finished_at = timezone.now()
    batch.save(update_fields=["status", "finished_at"])


@transaction.atomic
def vm_record_report(
    *, vm_id: str, operation: str, ok: bool, state: str, reason: str, node: str, final: bool = True
) -> VM | None:
    """Apply a node's report of an operation's outcome. Idempotent: a duplicate report changes nothing.

    ``final=False`` reports that work started: a pending VM becomes ``provisioning``.
    """
    vm = VM.objects.select_for_update(of=("self",)).select_related("node").filter(pk=vm_id).first()
    if vm is None:
        logger.warning("report for unknown VM %s from node %s ignored", vm_id, node)
        return None
    if vm.node is None or vm.node.name != node:
        logger.warning("report for VM %s from node %s, but it is on %s: ignored", vm_id, node, vm.node)
        return vm
    if vm.state == VMState.DELETED:
        return vm
    vm_cache.vms_changed([vm])  # what follows may change what the API shows of it
    if not final:
        if operation == "create" and vm.state == VMState.PENDING:
            vm.state = VMState.PROVISIONING
            vm.save(update_fields=["state", "updated_at"])
        return vm
    if operation == "delete":
        if ok:
            _finish_delete(vm)
        else:
            vm.state, vm.state_reason = VMState.ERROR, f"Delete failed: {reason}"[:1000]
            vm.save(update_fields=["state", "state_reason", "updated_at"])
        _finish_batch_items(vm, ok, reason)
        return vm
    if vm.state == VMState.DELETING:
        return vm  # a late report of an earlier operation; the delete decides
    if operation == "create" and not ok:
        # The node cleaned up what it started; give the capacity back so the VM holds nothing.
        scheduler.release(node_id=vm.node.pk, demand=vm_demand(vm))
        vm.node = None
        vm.state, vm.state_reason = VMState.ERROR, f"Create failed: {reason}"[:1000]
        vm.save(update_fields=["node", "state", "state_reason", "updated_at"])
        _finish_batch_items(vm, False, reason)
        return vm
    if state in VMState.values and state not in (VMState.DELETED, VMState.DELETING):
        vm.state = state
    vm.state_reason = "" if ok else f"{operation.capitalize()} failed: {reason}"[:1000]
    if operation in (vm.pending_action, "create"):
        vm.pending_action = VMAction.NONE
    vm.save(update_fields=["state", "state_reason", "pending_action", "updated_at"])
    if operation == "create":
        _finish_batch_items(vm, ok, reason)
    return vm


# VM states a node's own observation may overwrite; transitions in flight are decided by their task.
_OBSERVABLE = frozenset({VMState.RUNNING, VMState.STOPPED, VMState.ERROR})


@transaction.atomic
def node_apply_vm_states(*, node: str, vms: list[dict[str, Any]], complete: bool) -> None:
    """Fold a node's view of its VMs into the records.

    ``complete`` means ``vms`` is everything the node holds (sent at start and after an outage): VMs
    it lacks are resolved (a lost create is sent again, a lost delete is finished) and VMs it holds
    that were deleted here are deleted there. Otherwise only VMs whose state changed are listed.
    """
    node_row = Node.objects.filter(name=node).first()
    if node_row is None:
        logger.warning("VM states from unknown node %s ignored", node)
        return
    reported = {str(entry["id"]): entry for entry in vms if isinstance(entry, dict) and "id" in entry}
    records = VM.objects.select_for_update(of=("self",)).select_related("node", "image")
    touched: list[VM] = []
    for vm in records.filter(node=node_row).exclude(state=VMState.DELETED):
        entry = reported.pop(str(vm.pk), None)
        if entry is None:
            if complete:
                _resolve_missing(vm, node_row)
                touched.append(vm)
            continue
        if vm.state in (VMState.PENDING, VMState.PROVISIONING):
            if complete:  # the create may have been lost with the worker; it is idempotent
                dispatch.send_on_commit(vm, contract.NODE_VM_CREATE)
            continue
        if vm.state not in _OBSERVABLE or (vm.pending_action and not complete):
            continue
        state = entry.get("state")
        if state not in _OBSERVABLE:
            continue
        changed = state != vm.state or (complete and vm.pending_action)
        if changed:
            vm.state = state
            vm.state_reason = str(entry.get("reason", ""))[:1000] if state != VMState.RUNNING else ""
            if complete:
                vm.pending_action = VMAction.NONE
            vm.save(update_fields=["state", "state_reason", "pending_action", "updated_at"])
            touched.append(vm)
    vm_cache.vms_changed(touched)
    if complete:
        for vm in records.filter(pk__in=list(reported), state=VMState.DELETED):
            dispatch.send_to_node_on_commit(node, vm, contract.NODE_VM_DELETE)


def _resolve_missing(vm: VM, node: Node) -> None:
    if vm.state in (VMState.PENDING, VMState.PROVISIONING):
        dispatch.send_on_commit(vm, contract.NODE_VM_CREATE)
    elif vm.state == VMState.DELETING:
        _finish_delete(vm)
        _finish_batch_items(vm, True, "")
    elif vm.state != VMState.MIGRATING:
        vm.state = VMState.ERROR
        vm.state_reason = f"Node {node.name} does not hold this VM any more (checked when it came back)."
        vm.pending_action = VMAction.NONE
        vm.save(update_fields=["state", "state_reason", "pending_action", "updated_at"])


def nodes_check_heartbeats(*, client: redis.Redis) -> dict[str, int]:
    """Record heartbeats from Redis; mark silent nodes down (their VMs in error) and returning ones up."""
    timeout = timedelta(seconds=novacron_setting("NODE_HEARTBEAT_TIMEOUT"))
    now = timezone.now()
    nodes = list(Node.objects.all())
    if not nodes:
        return {"up": 0, "down": 0}
    beats = client.mget([contract.HEARTBEAT_KEY.format(name=node.name) for node in nodes])
    counts = {"up": 0, "down": 0}
    for node, raw in zip(nodes, beats, strict=True):
        beat = _parse_beat(raw)
        if beat is not None:
            counts["up"] += 1
            _node_alive(node, beat)
        elif node.status != NodeStatus.DOWN and (node.last_heartbeat or node.created_at) < now - timeout:
            counts["down"] += 1
            _node_down(node, now)
    return counts


def _parse_beat(raw: bytes | str | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        beat = json.loads(raw)
        float(beat["ts"])
    except (ValueError, KeyError, TypeError):
        logger.warning("unreadable heartbeat ignored: %r", raw[:200])
        return None
    return beat if isinstance(beat.get("vms"), list) else None


@transaction.atomic
def _node_alive(node: Node, beat: dict[str, Any]) -> None:
    seen = datetime.fromtimestamp(float(beat["ts"]), tz=UTC)
    node = Node.objects.select_for_update().get(pk=node.pk)
    came_back = node.status == NodeStatus.DOWN
    node.last_heartbeat = seen
    fields = ["last_heartbeat", "updated_at"]
    if came_back:
        node.status, node.status_reason = NodeStatus.UP, ""
        fields += ["status", "status_reason"]
        logger.info("node %s is back", node.name)
    node.save(update_fields=fields)
    if came_back:
        node_apply_vm_states(node=node.name, vms=beat["vms"], complete=True)
    else:
        _settle_stale_work(node, beat["vms"])
    _clean_migration_leftovers(node, beat, seen)


def _clean_migration_leftovers(node: Node, beat: dict[str, Any], seen: datetime) -> None:
    """Copies the node holds of VMs recorded elsewhere: the cleanup a migration sent may have been lost."""
    from apps.migrations.services import node_clean_migration_leftovers  # noqa: PLC0415 - migrations depend on vms

    held = [str(entry["id"]) for entry in beat["vms"] if isinstance(entry, dict) and "id" in entry]
    partial = beat.get("partial")  # half-made copies without a definition (older nodes send none)
    if isinstance(partial, list):
        held += [str(vm_id) for vm_id in partial]
    if held:
        node_clean_migration_leftovers(node=node, vm_ids=held, seen=seen)


# A node's report of an operation can be lost: the Redis transport pops a message before it records it
# as unacknowledged, so a control worker SIGKILLed in between loses it for good (found by the fault
# test 'control worker killed while a batch runs': one VM stayed 'provisioning', its batch 'running').
# The heartbeat lists every VM's observed state every few seconds; work still unsettled this long after
# the record last changed is settled from it. Long enough for any report in flight to arrive first.
STALE_WORK_SECONDS = 30


def _settle_stale_work(node: Node, vms: list[dict[str, Any]]) -> None:
    observed = {
        str(entry["id"]): entry
        for entry in vms
        if isinstance(entry, dict) and "id" in entry and entry.get("state") in _OBSERVABLE
    }
    if not observed:
        return
    cutoff = timezone.now() - timedelta(seconds=STALE_WORK_SECONDS)
    stale = (
        VM.objects.select_for_update(of=("self",), skip_locked=True)
        .filter(node=node, pk__in=list(observed), updated_at__lt=cutoff)
        .filter(Q(state__in=[VMState.PENDING, VMState.PROVISIONING]) | ~Q(pending_action=VMAction.NONE))
        .exclude(state__in=[VMState.DELETING, VMState.DELETED, VMState.MIGRATING])
    )
    stale_vms = list(stale)
    if stale_vms:
        vm_cache.vms_changed(stale_vms)
    for vm in stale_vms:
        entry = observed[str(vm.pk)]
        creating = vm.state in (VMState.PENDING, VMState.PROVISIONING)
        logger.warning(
            "VM %s: %s not reported for %d s; settled from node %s's heartbeat (%s)",
            vm.pk,
            "create" if creating else vm.pending_action,
            STALE_WORK_SECONDS,
            node.name,
            entry["state"],
        )
        vm.state = entry["state"]
        vm.state_reason = str(entry.get("reason", ""))[:1000] if entry["state"] != VMState.RUNNING else ""
        vm.pending_action = VMAction.NONE
        vm.save(update_fields=["state", "state_reason", "pending_action", "updated_at"])
        if creating:
            _finish_batch_items(vm, entry["state"] != VMState.ERROR, vm.state_reason)


@transaction.atomic
def _node_down(node: Node, now: datetime) -> None:
    node = Node.objects.select_for_update().get(pk=node.pk)
    since = node.last_heartbeat.isoformat(timespec="seconds") if node.last_heartbeat else "never"
    node.status = NodeStatus.DOWN
    node.status_reason = f"No heartbeat since {since}."
    node.save(update_fields=["status", "status_reason", "updated_at"])
    reason = f"Node {node.name} is down (no heartbeat since {since}); state unknown until it returns."
    running = VM.objects.filter(node=node, state__in=[VMState.RUNNING, VMState.STOPPED])
    vm_cache.vm_rows_changed(running.select_for_update().values_list("id", "project_id"))
    affected = running.update(state=VMState.ERROR, state_reason=reason, updated_at=now)
    logger.warning("node %s marked down; %d VM(s) in error until it returns", node.name, affected)
