"""Control-queue tasks of the VM app: batch fan-out and the reports node workers send back.

Tasks take ids, re-fetch, call one service, and are idempotent: at-least-once delivery may run them
twice and a repeated report changes nothing.
"""

import uuid
from typing import Any

import redis
from celery import shared_task
from django.conf import settings

from apps.images import fetches
from apps.networks.nics import NICS_PREFETCH
from workers import contract

from . import dispatch, services
from .choices import BatchItemStatus
from .models import VM, BatchItem


@shared_task(name="apps.vms.tasks.batch_dispatch", acks_late=True, time_limit=120)
def batch_dispatch(*, batch_id: str, task_name: str) -> int:
    """Send a batch's node tasks as one Celery group; each item completes through ``vm_report``."""
    vm_ids = BatchItem.objects.filter(
        batch_id=uuid.UUID(batch_id), status=BatchItemStatus.PENDING
    ).values_list("vm_id", flat=True)
    vms = list(
        VM.objects.filter(pk__in=list(vm_ids), node__isnull=False)
        .select_related("node", "image")
        .prefetch_related(NICS_PREFETCH)
    )
    count = len(vms)
    if task_name == contract.NODE_VM_CREATE:  # VMs of stored images wait for their node's copy
        stored = [vm for vm in vms if fetches.is_stored(vm.image)]
        if stored:
            fetches.send_creates(stored)
            vms = [vm for vm in vms if not fetches.is_stored(vm.image)]
    dispatch.send_group(vms, task_name)
    return count


@shared_task(name=contract.CONTROL_VM_REPORT, acks_late=True, time_limit=60)
def vm_report(
    *, vm_id: str, operation: str, ok: bool, state: str, reason: str = "", node: str, final: bool = True
) -> None:
    """A node reports the outcome of an operation on a VM (or, ``final=False``, that work started)."""
    services.vm_record_report(
        vm_id=vm_id, operation=operation, ok=ok, state=state, reason=reason, node=node, final=final
    )


@shared_task(name=contract.CONTROL_NODE_REGISTER, acks_late=True, time_limit=60)
def node_register(**fields: Any) -> None:
    """A node worker announces itself (at start and whenever its facts change)."""
    services.node_register(**fields)


@shared_task(name=contract.CONTROL_NODE_VM_STATES, acks_late=True, time_limit=60)
def node_vm_states(*, node: str, vms: list[dict[str, Any]], complete: bool) -> None:
    """A node lists its VMs' states: all of them at start, or those that changed by themselves."""
    services.node_apply_vm_states(node=node, vms=vms, complete=complete)


@shared_task(name="apps.vms.tasks.nodes_check_heartbeats", acks_late=True, time_limit=30, expires=10)
def nodes_check_heartbeats() -> dict[str, int]:
    """Beat task: fold heartbeats from Redis into the node rows, mark silent nodes down."""
    client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=5)
    return services.nodes_check_heartbeats(client=client)
