"""A migration's status: the transitions it may take, and the history every change leaves.

Every status change goes through ``transition`` (checked against ``TRANSITIONS``, recorded as a
MigrationEvent, announced to the webhook); a change that keeps the status (a phase, a note for an
operator) is recorded too. Callers hold the migration's row lock (``locked``).
"""

import logging

import redis
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from apps.core.conf import novacron_setting
from apps.core.errors import InvalidState
from apps.networks import peers

from .. import progress
from ..choices import RUNNING_STATUSES, TERMINAL_STATUSES, MigrationPhase, MigrationStatus
from ..models import Migration, MigrationEvent

logger = logging.getLogger(__name__)

S = MigrationStatus
TRANSITIONS: dict[MigrationStatus, frozenset[MigrationStatus]] = {
    S.QUEUED: frozenset({S.PREPARING, S.CANCELLED, S.FAILED}),
    S.PREPARING: frozenset({S.TRANSFERRING, S.CANCELLED, S.FAILED}),
    S.TRANSFERRING: frozenset({S.SWITCHING, S.CANCELLED, S.FAILED}),
    S.SWITCHING: frozenset({S.COMPLETED, S.FAILED}),
    S.COMPLETED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
}


def locked(migration: Migration) -> Migration:
    """The migration's row, locked, with what its services read."""
    return (
        Migration.objects.select_for_update(of=("self",))
        .select_related("vm", "vm__image", "source_node", "dest_node")
        .get(pk=migration.pk)
    )


def transition(
    migration: Migration, to: MigrationStatus, *, actor: str, detail: str = "", phase: str | None = None
) -> None:
    """Move a locked migration to ``to`` (checked against the table) and record the event."""
    current = MigrationStatus(migration.status)
    if to not in TRANSITIONS[current]:
        raise InvalidState(f"Migration {migration.pk} cannot go from {current} to {to}.")
    now = timezone.now()
    migration.status = to
    if phase is not None:
        migration.phase = phase
    if to == S.PREPARING:
        migration.started_at = now
    if to in RUNNING_STATUSES:
        migration.last_progress_at = now
    if to in TERMINAL_STATUSES:
        migration.finished_at = now
        migration.phase = MigrationPhase.NONE
    migration.save()
    event = MigrationEvent.objects.create(
        migration=migration,
        actor=actor[:150],
        from_status=current,
        to_status=to,
        phase=migration.phase,
        detail=detail,
    )
    announce(migration, event)
    if to in TERMINAL_STATUSES:
        forget_progress(migration)
    if to == S.PREPARING or to in TERMINAL_STATUSES:
        # The destination starts or stops hosting the VM's networks (before its prepare is sent,
        # so that it and the other nodes know each other before the RAM moves; after the switch or
        # the roll-back, the side that no longer holds the VM leaves).
        peers.sync_on_commit(vm_ids=[migration.vm_id])
    if novacron_setting("MIGRATION_WEBHOOK_URL"):
        from ..tasks import migration_webhook_send  # noqa: PLC0415  (tasks import services)

        event_id = event.pk
        transaction.on_commit(lambda: migration_webhook_send.delay(event_id=event_id))


def announce(migration: Migration, event: MigrationEvent) -> None:
    """After commit: the status change on the migration's events channel (for open streams)."""
    migration_id, status, phase, error = (
        str(migration.pk),
        str(migration.status),
        str(migration.phase),
        migration.error,
    )
    history = event.pk

    def publish() -> None:
        try:
            progress.publish_status(
                redis_client(), migration_id, status=status, phase=phase, error=error, history=history
            )
        except redis.RedisError as exc:  # a stream re-reads the state when it reconnects
            logger.warning("migration %s: status change not published: %s", migration_id, exc)

    transaction.on_commit(publish)


def forget_progress(migration: Migration) -> None:
    """After commit: the ended migration's Redis keys expire (its figures are in the row)."""
    migration_id = str(migration.pk)

    def forget() -> None:
        try:
            progress.forget(redis_client(), migration_id)
        except redis.RedisError as exc:  # they expire by their own TTL in any case
            logger.warning("migration %s: progress keys not dropped: %s", migration_id, exc)

    transaction.on_commit(forget)


def record_phase(migration: Migration, phase: str, *, actor: str) -> None:
    """Record the transfer's phase (a report's detail); an unknown or unchanged one changes nothing."""
    if phase == migration.phase or phase not in MigrationPhase.values:
        return
    migration.phase = phase
    migration.save(update_fields=["phase"])
    MigrationEvent.objects.create(
        migration=migration,
        actor=actor,
        from_status=migration.status,
        to_status=migration.status,
        phase=phase,
        detail=f"phase {phase}",
    )


def note(migration: Migration, detail: str, *, actor: str = "watchdog") -> None:
    """Record an event that changes no status (the history an operator reads)."""
    MigrationEvent.objects.create(
        migration=migration,
        actor=actor,
        from_status=migration.status,
        to_status=migration.status,
        phase=migration.phase,
        detail=detail,
    )


def redis_client() -> redis.Redis:
    return redis.Redis.from_url(settings.REDIS_URL, socket_timeout=5)
