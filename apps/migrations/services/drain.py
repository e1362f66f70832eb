"""Draining a node: every VM moves off it (live when running, cold when stopped); the node goes to
maintenance once it holds no VM and no migration involving it is in flight."""

from typing import Any

from django.contrib.auth.models import User
from django.db import transaction
from django.db.models import Q

from apps.core.errors import Conflict, InvalidInput, InvalidState, NoCapacity
from apps.vms.choices import NodeStatus, VMState
from apps.vms.models import VM, Node

from ..choices import ACTIVE_STATUSES, MigrationMode
from ..models import Migration
from .requests import migration_request


def node_drain(*, node: Node, requested_by: User) -> dict[str, Any]:
    """Move every VM off ``node`` (live when running, cold when stopped); the node goes to maintenance
    once it is empty. Per-VM results: the migration id, or why it could not be requested."""
    with transaction.atomic():
        node = Node.objects.select_for_update().get(pk=node.pk)
        if node.status == NodeStatus.DOWN:
            raise InvalidState(f"Node {node.name} is down: its VMs cannot be moved live.")
        node.status = NodeStatus.DRAINING
        node.status_reason = f"Draining, requested by {requested_by.get_username()}."
        node.save(update_fields=["status", "status_reason", "updated_at"])
    results: list[dict[str, Any]] = []
    vms = VM.objects.filter(node=node).exclude(state__in=[VMState.DELETED]).order_by("created_at")
    for vm in vms:
        if vm.state == VMState.MIGRATING:
            active = Migration.objects.filter(vm=vm, status__in=ACTIVE_STATUSES).first()
            results.append(
                {
                    "vm": str(vm.pk),
                    "name": vm.name,
                    "migration": str(active.pk) if active else None,
                    "result": "already migrating",
                }
            )
            continue
        mode = MigrationMode.LIVE if vm.state == VMState.RUNNING else MigrationMode.COLD
        try:
            migration = migration_request(vm=vm, requested_by=requested_by, mode=mode)
        except (InvalidState, Conflict, InvalidInput, NoCapacity) as exc:
            results.append({"vm": str(vm.pk), "name": vm.name, "migration": None, "result": exc.message})
            continue
        results.append(
            {
                "vm": str(vm.pk),
                "name": vm.name,
                "migration": str(migration.pk),
                "result": f"{mode} migration queued",
            }
        )
    node_drain_progress(node_id=node.pk)
    return {"node": node.name, "status": Node.objects.get(pk=node.pk).status, "vms": results}


@transaction.atomic
def node_drain_progress(*, node_id: int) -> None:
    """A draining node with no VM left and no migration in flight goes to maintenance."""
    node = Node.objects.select_for_update().get(pk=node_id)
    if node.status != NodeStatus.DRAINING:
        return
    busy = (
        VM.objects.filter(node=node).exclude(state=VMState.DELETED).exists()
        or Migration.objects.filter(
            Q(source_node=node) | Q(dest_node=node), status__in=ACTIVE_STATUSES
        ).exists()
    )
    if not busy:
        node.status = NodeStatus.MAINTENANCE
        node.status_reason = "Drained: no VMs left."
        node.save(update_fields=["status", "status_reason", "updated_at"])
