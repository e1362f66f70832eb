"""What an operator changes while a migration runs: cancel, bandwidth limit, force-complete.

The source node polls the control knobs in Redis (``progress.set_control``) while it transfers; a
migration that has not reached a node yet (queued, preparing) is cancelled here at once.
"""

from django.db import transaction

from apps.core.errors import InvalidState

from .. import progress
from ..choices import TERMINAL_STATUSES, MigrationMode, MigrationPhase, MigrationStatus
from ..models import Migration
from .outcomes import roll_back
from .state import locked, note, redis_client


@transaction.atomic
def migration_cancel(*, migration: Migration, actor: str) -> Migration:
    """Cancel in any phase before the switch; queued and preparing ones stop at once."""
    migration = locked(migration)
    status = MigrationStatus(migration.status)
    if status in TERMINAL_STATUSES or status == MigrationStatus.SWITCHING:
        raise InvalidState(f"Migration {migration.pk} is {status}: too late to cancel.")
    migration.cancel_requested = True
    migration.save(update_fields=["cancel_requested"])
    if status in (MigrationStatus.QUEUED, MigrationStatus.PREPARING):
        roll_back(
            migration, MigrationStatus.CANCELLED, actor=actor, detail=f"cancelled by {actor} while {status}"
        )
    else:
        # The source stops its transfer within a poll interval and reports "cancelled".
        progress.set_control(redis_client(), str(migration.pk), cancel=True)
        note(migration, "cancel requested", actor=actor)
    return migration


@transaction.atomic
def migration_set_bandwidth(
    *, migration: Migration, bandwidth_limit_mbps: int | None, actor: str
) -> Migration:
    migration = locked(migration)
    if migration.status in TERMINAL_STATUSES:
        raise InvalidState(f"Migration {migration.pk} is {migration.status}.")
    migration.bandwidth_limit_mbps = bandwidth_limit_mbps
    migration.save(update_fields=["bandwidth_limit_mbps"])
    progress.set_control(redis_client(), str(migration.pk), bandwidth_limit_mbps=bandwidth_limit_mbps)
    limit = f"{bandwidth_limit_mbps} Mbit/s" if bandwidth_limit_mbps else "lifted"
    note(migration, f"bandwidth limit {limit}", actor=actor)
    return migration


@transaction.atomic
def migration_force_complete(*, migration: Migration, actor: str) -> Migration:
    """Ask the source to pause the guest and copy what is left (for guests that dirty memory too fast).

    Only in the memory phase. The source also lifts the bandwidth limit for that last copy: the guest
    is down until it arrives.
    """
    migration = locked(migration)
    if migration.status != MigrationStatus.TRANSFERRING or migration.mode != MigrationMode.LIVE:
        raise InvalidState("Only a live migration that is transferring can be forced to complete.")
    if migration.phase != MigrationPhase.MEMORY:
        # Pausing now would make the whole memory copy downtime: convergence is a memory matter.
        raise InvalidState("Force-complete applies to the memory phase; the disk is still being mirrored.")
    progress.set_control(redis_client(), str(migration.pk), force_complete=True)
    note(migration, "force-complete requested", actor=actor)
    return migration
