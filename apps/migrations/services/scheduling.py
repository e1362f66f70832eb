"""Starting queued migrations, oldest first, within the per-node concurrency limits."""

from django.db import transaction
from django.db.models import Count

from apps.core.conf import novacron_setting

from ..choices import RUNNING_STATUSES, MigrationStatus
from ..models import Migration
from . import image_phase
from .state import transition


def migrations_schedule() -> list[str]:
    """Start queued migrations, oldest first, while their nodes are under the concurrency limits."""
    started: list[str] = []
    max_out = novacron_setting("MIGRATION_MAX_OUTGOING")
    max_in = novacron_setting("MIGRATION_MAX_INCOMING")
    with transaction.atomic():
        # One scheduler at a time: lock the queued rows; a concurrent call waits, then sees them started.
        queued = list(
            Migration.objects.select_for_update(of=("self",))
            .filter(status=MigrationStatus.QUEUED)
            .select_related("vm", "vm__image", "vm__node", "source_node", "dest_node")
            .order_by("created_at")
        )
        if not queued:
            return started
        running = Migration.objects.filter(status__in=RUNNING_STATUSES)
        outgoing = dict(
            running.values_list("source_node").annotate(n=Count("id")).values_list("source_node", "n")
        )
        incoming = dict(
            running.values_list("dest_node").annotate(n=Count("id")).values_list("dest_node", "n")
        )
        for migration in queued:
            if (
                outgoing.get(migration.source_node_id, 0) >= max_out
                or incoming.get(migration.dest_node_id, 0) >= max_in
            ):
                continue
            outgoing[migration.source_node_id] = outgoing.get(migration.source_node_id, 0) + 1
            incoming[migration.dest_node_id] = incoming.get(migration.dest_node_id, 0) + 1
            transition(
                migration,
                MigrationStatus.PREPARING,
                actor="system",
                detail=f"started; preparing {migration.dest_node.name}",
            )
            image_phase.begin(migration)  # the destination fetches the VM's base image first if needed
            started.append(str(migration.pk))
    return started
