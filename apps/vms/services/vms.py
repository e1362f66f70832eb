"""VM lifecycle requests from users and operators: create, change, delete, start/stop/reboot, batches.

Every service runs in one transaction, checks what a client can get wrong (400), quotas (403), state
(409) and capacity (409) before writing anything, and sends node tasks only after commit.
"""

import contextlib
import logging
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from django.contrib.auth.models import User
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from apps.core.conf import novacron_setting
from apps.core.context import Viewer
from apps.core.db import bulk_insert, none_elsewhere, postgresql_or
from apps.core.errors import Conflict, InvalidInput, InvalidState, QuotaExceeded, TooManyItems
from apps.images import fetches
from apps.networks import peers
from apps.networks import services as network_services
from apps.projects.services import lock_project
from apps.vms import cache as vm_cache
from apps.vms import cloud_init, dispatch, reads, representation, scheduler
from apps.vms.choices import (
    ACTIVE_STATES,
    BatchItemStatus,
    BatchKind,
    BatchStatus,
    NodeStatus,
    VMAction,
    VMState,
)
from apps.vms.models import VM, VM_NAME_UNIQUE, BatchItem, BatchOperation, Image, Node
from apps.vms.selectors import visible_project
from apps.vms.services.limits import check_new_names, check_quota, image_refusal, name_taken, project_state
from workers import contract

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VMRequest:
    """A validated request for one VM (references already resolved)."""

    name: str
    image: Image
    vcpus: int
    memory_mb: int
    disk_gb: int
    node: Node | None = None
    # Network names or ids, one NIC each, in order; None: the project's default network; empty: no NIC.
    networks: Sequence[str] | None = None
    # cloud-init (apps.vms.cloud_init, checked by the serializer); hostname empty: the VM's name.
    hostname: str = ""
    ssh_keys: Sequence[str] = ()
    user_data: str = ""


@dataclass(frozen=True)
class VMChanges:
    """Changes to one VM; ``None`` means unchanged."""

    name: str | None = None
    vcpus: int | None = None
    memory_mb: int | None = None
    disk_gb: int | None = None

    @property
    def resizes(self) -> bool:
        return any(value is not None for value in (self.vcpus, self.memory_mb, self.disk_gb))


# What a VM's answer reads of its relations (``apps.vms.representation``), loaded with a locked VM.
_RELATED = representation.relations()


def vm_demand(vm: VM) -> scheduler.Demand:
    """What ``vm`` takes of its node's capacity: reserved where it is placed, released where it leaves."""
    return scheduler.Demand(vm.vcpus, vm.memory_mb, vm.disk_gb)


def _create_many(
    *, owner: User, project_id: int, requests: Sequence[VMRequest], item_key: Callable[[int], str]
) -> list[VM]:
    """``item_key(index)``: the prefix of an item's error keys (``""``, ``"vms[3]."``)."""
    project = lock_project(project_id)
    names = [request.name for request in requests]
    limits, usage, taken = project_state(project_id, names)
    check_new_names(project_id, names, lambda index: f"{item_key(index)}name", taken)
    refused = {
        f"{item_key(index)}image": [reason]
        for index, request in enumerate(requests)
        if (reason := image_refusal(request.image, memory=request.memory_mb, disk=request.disk_gb))
    }
    if refused:
        raise InvalidInput(next(iter(refused.values()))[0], fields=refused)
    check_quota(
        project_id,
        vms=len(requests),
        vcpus=sum(request.vcpus for request in requests),
        memory_mb=sum(request.memory_mb for request in requests),
        known=(limits, usage),
    )
    # The networks' rows are locked next (their addresses are taken until the commit), then the nodes'.
    wanted = [request.networks for request in requests]
    attached = network_services.resolve_networks(project, wanted, item_key)
    plan = network_services.plan_addresses(attached)
    vm_cache.project_changed(project_id=project_id)
    # Last before the insert: the node rows the reservation updates stay locked until the commit.
    demands = [
        scheduler.Demand(request.vcpus, request.memory_mb, request.disk_gb, networked=bool(networks))
        for request, networks in zip(requests, attached, strict=True)
    ]
    nodes = scheduler.reserve(demands=demands, pinned=[request.node for request in requests])
    joining = peers.arrivals(
        (network.pk, node.pk)
        for networks, node in zip(attached, nodes, strict=True)
        if node is not None
        for network in networks
    )
    vms = [
        VM(
            owner=owner,
            project=project,
            name=request.name,
            image=request.image,
            node=node,
            vcpus=request.vcpus,
            memory_mb=request.memory_mb,
            disk_gb=request.disk_gb,
            hostname=request.hostname or cloud_init.hostname_for(request.name),
            ssh_keys=list(request.ssh_keys),
            user_data=request.user_data,
            state=VMState.PENDING,
        )
        for request, node in zip(requests, nodes, strict=True)
    ]
    try:
        created = list(bulk_insert(vms))
    except IntegrityError as exc:
        # Only a concurrent create of the same name gets here (names were checked under the project lock).
        # No savepoint: the Conflict leaves the caller's transaction, which rolls back, unused.
        raise Conflict("A VM with one of these names was created concurrently; retry.") from exc
    network_services.nics_insert(created, plan)
    peers.sync_on_commit(joining)
    return created


@transaction.atomic
def vm_create(*, owner: User, project_id: int, request: VMRequest) -> VM:
    """Record a VM of ``project_id`` as ``pending`` on a node with reserved capacity; its node
    creates it after commit."""
    (vm,) = _create_many(owner=owner, project_id=project_id, requests=[request], item_key=lambda _index: "")
    if fetches.is_stored(vm.image):  # its node may have to fetch the image first
        transaction.on_commit(lambda: fetches.send_creates([vm]))
    else:
        dispatch.send_on_commit(vm, contract.NODE_VM_CREATE)
    return vm


def _check_batch_size(count: int) -> None:
    limit = novacron_setting("BATCH_MAX_ITEMS")
    if count > limit:
        raise TooManyItems(f"A batch holds at most {limit} items; this one has {count}.")
    if count == 0:
        raise InvalidInput(
            "A batch needs at least one item.", fields={"vms": ["This list may not be empty."]}
        )


def _new_batch(
    owner: User, project_id: int, kind: BatchKind, vms: Sequence[VM], status: BatchItemStatus
) -> BatchOperation:
    batch = BatchOperation.objects.create(owner_id=owner.pk, project_id=project_id, kind=kind, total=len(vms))
    bulk_insert([BatchItem(batch=batch, index=index, vm=vm, status=status) for index, vm in enumerate(vms)])
    return batch


@transaction.atomic
def vm_batch_create(
    *, owner: User, project_id: int, requests: Sequence[VMRequest]
) -> tuple[BatchOperation, list[VM]]:
    """Create up to ``BATCH_MAX_ITEMS`` VMs in one transaction; the node tasks go out as one group."""
    _check_batch_size(len(requests))
    vms = _create_many(
        owner=owner, project_id=project_id, requests=requests, item_key=lambda index: f"vms[{index}]."
    )
    batch = _new_batch(owner, project_id, BatchKind.CREATE, vms, BatchItemStatus.PENDING)
    _send_batch_on_commit(batch, contract.NODE_VM_CREATE)
    return batch, vms


def _send_batch_on_commit(batch: BatchOperation, task_name: str) -> None:
    from apps.vms.tasks import batch_dispatch  # noqa: PLC0415 - tasks import services

    batch_id = str(batch.pk)
    transaction.on_commit(lambda: batch_dispatch.delay(batch_id=batch_id, task_name=task_name))


def _require(vm: VM, allowed: Iterable[str], action: str) -> None:
    if vm.state not in allowed:
        raise InvalidState(f"Cannot {action} VM {vm.name}: it is {vm.state}.")


def _apply_changes(vm: VM, changes: VMChanges) -> list[str]:
    """Validate and apply ``changes`` to a locked ``vm``; return the updated field names."""
    _require(vm, ACTIVE_STATES - {VMState.DELETING}, "change")
    updated: list[str] = []
    if changes.name is not None and changes.name != vm.name:
        vm.name = changes.name
        updated.append("name")
    if changes.resizes:
        _require(vm, {VMState.STOPPED}, "resize (stop it first)")
        if changes.disk_gb is not None and changes.disk_gb < vm.disk_gb:
            raise InvalidInput(
                "Disks can grow but not shrink.", fields={"disk_gb": ["Must be at least the current size."]}
            )
        new = scheduler.Demand(
            changes.vcpus if changes.vcpus is not None else vm.vcpus,
            changes.memory_mb if changes.memory_mb is not None else vm.memory_mb,
            changes.disk_gb if changes.disk_gb is not None else vm.disk_gb,
        )
        old = vm_demand(vm)
        grow = scheduler.Demand(
            max(new.vcpus - old.vcpus, 0),
            max(new.memory_mb - old.memory_mb, 0),
            max(new.disk_gb - old.disk_gb, 0),
        )
        shrink = scheduler.Demand(
            max(old.vcpus - new.vcpus, 0),
            max(old.memory_mb - new.memory_mb, 0),
            max(old.disk_gb - new.disk_gb, 0),
        )
        check_quota(vm.project_id, vms=0, vcpus=grow.vcpus, memory_mb=grow.memory_mb)
        if vm.node_id is not None:
            assert vm.node is not None
            if grow != scheduler.Demand(0, 0, 0):
                scheduler.reserve(demands=[grow], pinned=[vm.node])
            scheduler.release(node_id=vm.node_id, demand=shrink)
        vm.vcpus, vm.memory_mb, vm.disk_gb = new.vcpus, new.memory_mb, new.disk_gb
        updated += ["vcpus", "memory_mb", "disk_gb"]
    return updated


@transaction.atomic
def vm_update(*, vm: VM, changes: VMChanges) -> VM:
    """Rename a VM, or resize a stopped one (capacity and quota re-checked).

    Only a resize takes the project's lock (it is quota-checked): a rename's name check is a courtesy
    error, the partial unique index refuses a name taken concurrently (409).
    """
    if changes.resizes:
        lock_project(vm.project_id)
    vm = VM.objects.select_for_update(of=("self",)).select_related(*_RELATED).get(pk=vm.pk)
    if changes.name is not None and changes.name != vm.name:
        check_new_names(vm.project_id, [changes.name], lambda _index: "name")
    updated = _apply_changes(vm, changes)
    if updated:
        try:
            with transaction.atomic():
                vm.save(update_fields=[*updated, "updated_at"])
        except IntegrityError as exc:
            raise Conflict("A VM with that name was created concurrently; retry.") from exc
        vm_cache.vms_changed([vm])
    return vm


# A rename in one statement: the VM is renamed only if the caller may see it (its project's, unless
# staff reading the whole fleet), its state allows changes and the name is new; the row comes back
# with its names joined in, as ``reads.select_sql`` reads it. Parameters: the new name, the time,
# the id, the states, the project.
_RENAME_SQL = """
WITH renamed AS (
    UPDATE vms SET name = %(name)s, updated_at = %(now)s
    WHERE id = %(id)s AND state = ANY(%(states)s) AND name <> %(name)s {visible}
    RETURNING *
) {select}
"""
_RENAMABLE = sorted(state.value for state in ACTIVE_STATES - {VMState.DELETING})


@postgresql_or(none_elsewhere)
def vm_rename(*, viewer: Viewer, vm_id: uuid.UUID, name: str) -> dict[str, Any] | None:
    """Rename a VM ``viewer`` may see; the VM as the API's dict (:mod:`apps.vms.representation`).

    One statement instead of :func:`vm_update`'s visible-VM read, locked read, name check and save
    (a rename was half the CPU of the benchmark's writes). None when it changes nothing, i.e. no such
    VM for ``viewer``, a state that allows no change or the name it already has: :func:`vm_update` then
    answers (404, 409 or the VM unchanged). A live VM of the project with that name (committed, or
    committed while this waited for it) is refused by the partial unique index and reported as
    :func:`vm_update`'s name check reports it. PostgreSQL only (elsewhere None: the full path).
    """
    project = visible_project(viewer)
    sql = _RENAME_SQL.format(
        visible="" if project is None else "AND project_id = %(project)s",
        select=reads.select_sql("renamed", ("project_id",)),
    )
    params = {"name": name, "now": timezone.now(), "id": vm_id, "states": _RENAMABLE, "project": project}
    # Alone, the statement is its own transaction; in a caller's, a savepoint keeps a refusal from
    # aborting the caller's transaction.
    savepoint = transaction.atomic() if connection.in_atomic_block else contextlib.nullcontext()
    try:
        with savepoint:
            found = reads.rows(sql, params, ("project_id",))
    except IntegrityError as exc:
        if getattr(getattr(exc.__cause__, "diag", None), "constraint_name", None) != VM_NAME_UNIQUE:
            raise
        taken = name_taken(name)
        raise InvalidInput(taken, fields={"name": [taken]}) from exc
    if not found:
        return None
    row = found[0]
    vm_cache.vm_rows_changed([(vm_id, row.pop("project_id"))])
    return row


@transaction.atomic
def vm_batch_update(
    *, owner: User, project_id: int, changes: Sequence[tuple[VM, VMChanges]]
) -> tuple[BatchOperation, list[VM]]:
    """Apply changes to many VMs at once (of one project, or of several for staff): all or nothing."""
    _check_batch_size(len(changes))
    for locked_project in sorted({vm.project_id for vm, _ in changes}):  # one order: no deadlock
        lock_project(locked_project)
    ids = [vm.pk for vm, _ in changes]
    locked = VM.objects.select_for_update(of=("self",)).select_related(*_RELATED).in_bulk(ids)
    renamed = [
        (index, change.name)
        for index, (vm, change) in enumerate(changes)
        if change.name is not None and change.name != vm.name
    ]
    for renamed_project in sorted({changes[index][0].project_id for index, _ in renamed}):
        positions = [index for index, _ in renamed if changes[index][0].project_id == renamed_project]
        names = [changes[index][1].name or "" for index in positions]
        check_new_names(renamed_project, names, lambda i, at=positions: f"vms[{at[i]}].name")
    errors: dict[str, list[str]] = {}
    saved: list[VM] = []
    now = timezone.now()
    by_fields: dict[tuple[str, ...], list[VM]] = {}  # one UPDATE per set of changed fields, not per VM
    for index, (vm, change) in enumerate(changes):
        current = locked[vm.pk]
        try:
            updated = _apply_changes(current, change)
        except (InvalidState, InvalidInput, QuotaExceeded) as exc:
            errors[f"vms[{index}]"] = [exc.message]
            continue
        if updated:
            current.updated_at = now
            by_fields.setdefault(tuple(updated), []).append(current)
        saved.append(current)
    if errors:
        transaction.set_rollback(True)
        raise InvalidInput(next(iter(errors.values()))[0], fields=errors)
    for fields, rows in by_fields.items():
        VM.objects.bulk_update(rows, [*fields, "updated_at"])
    vm_cache.vms_changed(saved)
    batch = _new_batch(owner, project_id, BatchKind.UPDATE, saved, BatchItemStatus.SUCCEEDED)
    batch.status = BatchStatus.COMPLETED
    batch.finished_at = timezone.now()
    batch.save(update_fields=["status", "finished_at"])
    return batch, saved


def _mark_deleting(vm: VM, *, save: bool = True) -> bool:
    """Move a locked VM towards deletion; return True when a node must still delete it.

    ``save=False`` leaves writing the ``deleting`` state to the caller (one bulk UPDATE for a batch).
    """
    if vm.state == VMState.MIGRATING:
        raise InvalidState(f"Cannot delete VM {vm.name} while it migrates; cancel the migration first.")
    _require(vm, ACTIVE_STATES, "delete")
    if vm.node_id is None:
        _finish_delete(vm)
        return False
    vm.state = VMState.DELETING
    vm.pending_action = VMAction.NONE
    if save:
        vm.save(update_fields=["state", "pending_action", "updated_at"])
    return True


def _finish_delete(vm: VM) -> None:
    """The VM is gone: its capacity and its addresses are free; if its node hosts none of its
    networks any more, the networks' other nodes are told."""
    if vm.node_id is not None and vm.state != VMState.DELETED:
        scheduler.release(node_id=vm.node_id, demand=vm_demand(vm))
    released = network_services.nics_release([vm.pk])
    if vm.node_id is not None:
        peers.sync_on_commit(left={(network_id, vm.node_id) for network_id in released})
    vm.state = VMState.DELETED
    vm.pending_action = VMAction.NONE
    vm.deleted_at = timezone.now()
    vm.save(update_fields=["state", "pending_action", "deleted_at", "updated_at"])


@transaction.atomic
def vm_delete(*, vm: VM) -> VM:
    """Request deletion: ``deleting`` until the node confirms (or ``deleted`` at once if it is on none)."""
    vm = VM.objects.select_for_update(of=("self",)).select_related(*_RELATED).get(pk=vm.pk)
    if vm.state == VMState.DELETING:
        dispatch.send_on_commit(
            vm, contract.NODE_VM_DELETE
        )  # a repeated DELETE re-sends: idempotent on the node
        return vm
    if _mark_deleting(vm):
        dispatch.send_on_commit(vm, contract.NODE_VM_DELETE)
    vm_cache.vms_changed([vm])
    return vm


@transaction.atomic
def vm_batch_delete(*, owner: User, project_id: int, vms: Sequence[VM]) -> tuple[BatchOperation, list[VM]]:
    _check_batch_size(len(vms))
    locked = (
        VM.objects.select_for_update(of=("self",)).select_related(*_RELATED).in_bulk([vm.pk for vm in vms])
    )
    errors = {
        f"ids[{index}]": [f"VM {vm.name} is already {locked[vm.pk].state}."]
        for index, vm in enumerate(vms)
        if locked[vm.pk].state not in ACTIVE_STATES - {VMState.DELETING}
    }
    if errors:
        raise InvalidInput(next(iter(errors.values()))[0], fields=errors)
    ordered = [locked[vm.pk] for vm in vms]
    remote = [vm for vm in ordered if _mark_deleting(vm, save=False)]
    now = timezone.now()
    for vm in remote:
        vm.updated_at = now
    VM.objects.bulk_update(remote, ["state", "pending_action", "updated_at"])
    vm_cache.vms_changed(ordered)
    batch = _new_batch(owner, project_id, BatchKind.DELETE, ordered, BatchItemStatus.PENDING)
    done = {vm.pk for vm in ordered} - {vm.pk for vm in remote}
    if done:
        BatchItem.objects.filter(batch=batch, vm_id__in=done).update(status=BatchItemStatus.SUCCEEDED)
    if remote:
        _send_batch_on_commit(batch, contract.NODE_VM_DELETE)
    else:
        batch.status = BatchStatus.COMPLETED
        batch.finished_at = timezone.now()
        batch.save(update_fields=["status", "finished_at"])
    return batch, ordered


_ACTIONS: dict[VMAction, tuple[frozenset[VMState], str]] = {
    VMAction.START: (frozenset({VMState.STOPPED, VMState.ERROR}), contract.NODE_VM_START),
    VMAction.STOP: (frozenset({VMState.RUNNING, VMState.ERROR}), contract.NODE_VM_STOP),
    VMAction.REBOOT: (frozenset({VMState.RUNNING}), contract.NODE_VM_REBOOT),
}


@transaction.atomic
def vm_request_action(*, vm: VM, action: VMAction) -> VM:
    """Ask the VM's node to start, stop or reboot it; 409 when its state does not allow that."""
    vm = VM.objects.select_for_update(of=("self",)).select_related(*_RELATED).get(pk=vm.pk)
    allowed, task_name = _ACTIONS[action]
    if vm.pending_action and vm.pending_action != action:
        raise InvalidState(f"Cannot {action} VM {vm.name}: a {vm.pending_action} is still in progress.")
    if vm.pending_action != action:
        _require(vm, allowed, str(action))
    if vm.node is None:
        raise InvalidState(f"Cannot {action} VM {vm.name}: it is on no node.")
    if vm.node.status == NodeStatus.DOWN:
        raise InvalidState(f"Cannot {action} VM {vm.name}: its node {vm.node.name} is down.")
    vm.pending_action = action
    vm.save(update_fields=["pending_action", "updated_at"])
    vm_cache.vms_changed([vm])
    dispatch.send_on_commit(vm, task_name)
    return vm
