"""Leftover copies: a node still holding a copy of a VM that its migrations placed elsewhere.

Two ways a copy is left behind, two answers. A node's heartbeat lists a VM recorded on another node
long after its migration ended: its lost last message is sent again (``node_clean_migration_leftovers``).
A node worker that starts lists its destination copies: those whose migration ended are named back to
it for removal (``node_migration_copies``). A copy whose guest may have run there is never removed here.
"""

import logging
import uuid
from collections.abc import Iterable
from datetime import datetime, timedelta

from django.core.cache import cache
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from apps.vms.models import VM, Node
from workers import contract

from ..choices import ACTIVE_STATUSES, MigrationStatus
from ..models import Migration, MigrationEvent
from . import node_tasks
from .state import note

logger = logging.getLogger(__name__)

# A migration's last message to a node can be lost (Redis restarted with it in flight, a worker killed
# between taking and running it): the source's cleanup after a completed migration, or the destination's
# abort after a failed or cancelled one. That node's copy then lingers and two nodes hold the VM (seen
# by the fault test 'Redis restarted during a live migration'). Every heartbeat lists what its node
# holds; a copy the records place elsewhere, still listed this long after its migration ended, gets its
# message again. Long enough for the normal message to arrive and run first; a copy sent twice changes
# nothing (both tasks remove only the copy whose migration marker names that migration and role).
MIGRATION_LEFTOVER_GRACE_SECONDS = 30
# After this many re-sends a copy that stays is no longer a lost message: it is left to an operator
# (the migration's history shows every attempt), rather than re-sent every grace period for ever.
MIGRATION_LEFTOVER_MAX_RESENDS = 3
_RECONCILER = "reconciler"


@transaction.atomic
def node_clean_migration_leftovers(*, node: Node, vm_ids: Iterable[str], seen: datetime) -> list[str]:
    """Send again the cleanup of copies ``node`` still held at ``seen`` that the records place elsewhere.

    For each such VM with no migration involving ``node`` in flight, the last migration involving the
    node that started decides: completed from it -> the source cleanup; failed or cancelled to it -> the
    destination's abort. A VM recorded on ``node`` is never touched here. Returns the migration ids.
    """
    ids = _valid_uuids(vm_ids)
    if not ids:
        return []
    strays = list(
        VM.objects.select_for_update(of=("self",), skip_locked=True)
        .filter(pk__in=ids)
        .exclude(node=node)
        .select_related("image", "node")
    )
    if not strays:
        return []
    now = timezone.now()
    grace = timedelta(seconds=MIGRATION_LEFTOVER_GRACE_SECONDS)
    cutoff = min(seen, now) - grace
    sent: list[str] = []
    for vm in strays:
        involving = Migration.objects.filter(vm=vm).filter(Q(source_node=node) | Q(dest_node=node))
        if involving.filter(status__in=ACTIVE_STATUSES).exists():
            continue  # this node's copy is the migration's own business
        last = involving.exclude(started_at=None).order_by("-started_at", "-id").first()
        if last is None:
            _note_left_alone(vm, node, "no started migration involved this node")
            continue
        ended = last.finished_at or last.created_at
        if ended >= cutoff:
            continue  # its own cleanup may still be on its way
        role: contract.Role
        if last.status == MigrationStatus.COMPLETED and last.source_node_id == node.pk:
            role, what = "source", "source cleanup"
        elif (
            last.status in (MigrationStatus.FAILED, MigrationStatus.CANCELLED)
            and last.dest_node_id == node.pk
        ):
            role, what = "dest", "destination abort"
            if last.events.filter(detail__startswith="dest kept:").exists():
                # The node kept it at its start: its guest ran there, it may be the VM's only copy.
                _note_left_alone(
                    vm, node, f"{node.name} kept its copy (migration {last.pk}): its guest ran there"
                )
                continue
        else:
            _note_left_alone(vm, node, f"its last migration {last.pk} ({last.status}) does not explain it")
            continue
        attempts = MigrationEvent.objects.filter(migration=last, actor=_RECONCILER)
        if attempts.filter(at__gte=now - grace).exists():
            continue  # the last re-send may still be on its way
        count = attempts.count()
        if count >= MIGRATION_LEFTOVER_MAX_RESENDS:
            _note_left_alone(vm, node, f"the {what} of migration {last.pk} was sent again {count} times")
            continue
        home = vm.node.name if vm.node else "no node"
        last_try = ""
        if count + 1 == MIGRATION_LEFTOVER_MAX_RESENDS:
            last_try = " (last attempt: remove it by hand if it stays)"
        logger.warning(
            "VM %s still held by node %s, recorded on %s, %d s after migration %s ended %s: %s sent again%s",
            vm.pk,
            node.name,
            home,
            int((now - ended).total_seconds()),
            last.pk,
            last.status,
            what,
            last_try,
        )
        note(
            last,
            f"{node.name} still holds a copy (VM recorded on {home}): {what} sent again{last_try}",
            actor=_RECONCILER,
        )
        last.vm = vm
        if role == "source":
            node_tasks.send_cleanup(last, node=node)
        else:
            node_tasks.send_abort(last, "dest", node=node)
        sent.append(str(last.pk))
    return sent


@transaction.atomic
def node_migration_copies(*, node: str, copies: list[contract.MigrationCopy]) -> list[str]:
    """Answer a starting node's list of destination copies with those that are leftovers.

    A copy is a leftover when its migration is failed or cancelled, or unknown here (removed with its
    VM), and the VM is not recorded on ``node``. A copy of an active migration, or of a completed one
    (the copy is then the VM), is never named. The node sends back "aborted" or "kept" for each named
    copy (``contract.NODE_MIGRATION_LEFTOVERS``). Returns the migration ids named.
    """
    dest_copies = [copy for copy in copies if copy.get("role") == "dest"]
    valid = {str(value) for value in _valid_uuids(copy["migration_id"] for copy in dest_copies)}
    migrations = {
        str(migration.pk): migration
        for migration in Migration.objects.filter(pk__in=valid).select_related("dest_node")
    }
    held_here = {
        str(pk)
        for pk in VM.objects.filter(
            pk__in=_valid_uuids(copy["vm_id"] for copy in dest_copies), node__name=node
        ).values_list("pk", flat=True)
    }
    ended: list[contract.MigrationCopy] = []
    for copy in dest_copies:
        migration = migrations.get(copy["migration_id"])
        if copy["migration_id"] not in valid or copy["vm_id"] in held_here:
            continue
        if migration is None:
            ended.append(copy)
        elif (
            migration.dest_node.name == node
            and str(migration.vm_id) == copy["vm_id"]
            and migration.status in (MigrationStatus.FAILED, MigrationStatus.CANCELLED)
        ):
            ended.append(copy)
            note(
                migration, f"{node} started holding its destination copy: asked to remove it", actor="system"
            )
    if ended:
        node_tasks.send_leftovers(node, ended)
    return [copy["migration_id"] for copy in ended]


def _valid_uuids(values: Iterable[str]) -> list[uuid.UUID]:
    valid = []
    for value in values:
        try:
            valid.append(uuid.UUID(str(value)))
        except ValueError:
            logger.warning("heartbeat lists a VM id that is no UUID: %r; ignored", str(value)[:100])
    return valid


def _note_left_alone(vm: VM, node: Node, why: str) -> None:
    """Warn about a stray copy this reconciliation does not remove: once per grace period, not per beat."""
    if cache.add(f"migrations:stray-copy:{node.pk}:{vm.pk}", 1, MIGRATION_LEFTOVER_GRACE_SECONDS):
        logger.warning(
            "VM %s is recorded on %s (%s) but node %s holds a copy: %s; left alone",
            vm.pk,
            vm.node.name if vm.node else "no node",
            vm.state,
            node.name,
            why,
        )
