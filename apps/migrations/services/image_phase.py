"""A migration's image phase: the destination fetches the VM's stored base image before it prepares.

A migration of a VM whose image is stored (``apps.images.fetches.is_stored``) starts (``preparing``)
in phase ``image`` when its destination lacks the image: the fetch runs (or is joined) and the
destination is told to prepare only once it holds the image. A failed fetch rolls the migration back
before anything moved: the VM keeps running on its source only. Fetch progress counts as the
migration's progress for the stall watchdog.
"""

from django.utils import timezone

from apps.images import fetches
from apps.images.models import NodeImage, NodeImageState

from ..choices import MigrationPhase, MigrationStatus
from ..models import Migration
from . import node_tasks
from .outcomes import roll_back
from .state import locked, note, record_phase


def begin(migration: Migration) -> None:
    """Prepare the destination of a locked migration that just started, once it holds the base."""
    image = migration.vm.image
    if fetches.is_stored(image):
        row = fetches.ensure(migration.dest_node, image)
        if row.state != NodeImageState.READY:
            record_phase(migration, MigrationPhase.IMAGE, actor="system")
            note(migration, f"{migration.dest_node.name}: {fetches.waiting_reason(row)}", actor="system")
            return
    node_tasks.send_prepare(migration)


def _waiting(row: NodeImage) -> list[Migration]:
    return [
        locked(migration)
        for migration in Migration.objects.filter(
            status=MigrationStatus.PREPARING,
            phase=MigrationPhase.IMAGE,
            dest_node=row.node_id,
            vm__image=row.image_id,
        )
    ]


def fetch_moved(row: NodeImage, reason: str) -> None:
    """The fetch moved: the waiting migrations are not stalled."""
    Migration.objects.filter(
        status=MigrationStatus.PREPARING,
        phase=MigrationPhase.IMAGE,
        dest_node=row.node_id,
        vm__image=row.image_id,
    ).update(last_progress_at=timezone.now())


def fetch_done(row: NodeImage) -> None:
    """The destination holds the base image: its waiting migrations prepare."""
    for migration in _waiting(row):
        if migration.status != MigrationStatus.PREPARING or migration.phase != MigrationPhase.IMAGE:
            continue
        note(migration, f"{row.node.name} holds image {row.image.name} (from {row.source})", actor="system")
        migration.phase = MigrationPhase.NONE
        migration.last_progress_at = timezone.now()
        migration.save(update_fields=["phase", "last_progress_at"])
        node_tasks.send_prepare(migration)


def fetch_failed(row: NodeImage, reason: str) -> None:
    """The base image could not reach the destination: its waiting migrations fail, nothing moved."""
    for migration in _waiting(row):
        if migration.status == MigrationStatus.PREPARING and migration.phase == MigrationPhase.IMAGE:
            roll_back(migration, MigrationStatus.FAILED, actor="system", detail=reason)
