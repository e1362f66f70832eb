"""The stall watchdog (beat): fails running migrations whose progress stopped moving.

A stalled ``switching`` migration is different: past the switch the source may have handed its guest
over, so only the destination's heartbeat settles it (``switching_decision``), and an unknown answer
waits, then goes to an operator, rather than rolling back.
"""

import json
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

import redis
from django.db import transaction
from django.utils import timezone

from apps.core.conf import novacron_setting
from workers import contract

from .. import progress
from ..choices import RUNNING_STATUSES, MigrationStatus
from ..models import Migration
from .outcomes import complete, roll_back
from .state import locked, note, redis_client

logger = logging.getLogger(__name__)


def migrations_watchdog() -> list[str]:
    """Fail running migrations whose progress has not moved for ``MIGRATION_STALL_TIMEOUT`` seconds.

    A stalled ``switching`` migration is settled by the destination's heartbeat instead (see
    ``switching_decision``): never rolled back on an unknown answer. Returns the ids it failed.
    """
    timeout = timedelta(seconds=novacron_setting("MIGRATION_STALL_TIMEOUT"))
    client = redis_client()
    failed = []
    now = timezone.now()
    for migration in Migration.objects.filter(status__in=RUNNING_STATUSES):
        try:
            moved: bool | None = progress.note_movement(client, str(migration.pk))
            # A cut link the nodes are reconnecting within their outage limit counts as moving.
            moved = moved or _reconnecting(client, str(migration.pk))
        except redis.RedisError as exc:
            moved = None  # the progress is unreadable, not still: only the switch is looked at now
            logger.warning("watchdog: progress of migration %s unreadable: %s", migration.pk, exc)
        if moved:  # the stall clock starts again (after a cut, once the link is back)
            Migration.objects.filter(pk=migration.pk).update(last_progress_at=now)
            continue
        if (migration.last_progress_at or migration.created_at) >= now - timeout:
            continue
        try:
            with transaction.atomic():
                current = locked(migration)
                if current.status == MigrationStatus.SWITCHING:
                    if _settle_switching(client, current, now=now) == "roll_back":
                        failed.append(str(migration.pk))
                elif current.status in RUNNING_STATUSES and moved is not None:
                    roll_back(
                        current,
                        MigrationStatus.FAILED,
                        actor="watchdog",
                        detail=f"no progress for {int(timeout.total_seconds())} s",
                    )
                    failed.append(str(migration.pk))
        except redis.RedisError as exc:  # Redis went away mid-way: nothing was written; next tick again
            logger.warning("watchdog: migration %s left for the next tick: %s", migration.pk, exc)
    return failed


def _reconnecting(client: redis.Redis, migration_id: str) -> bool:
    """The source reports its link to the destination cut for no longer than the outage limit."""
    fields = progress.read(client, migration_id)
    if fields.get("link") != "reconnecting":
        return False
    try:
        outage = float(fields.get("outage_seconds", 0))
    except (TypeError, ValueError):
        return False
    return outage <= novacron_setting("MIGRATION_LINK_OUTAGE_SECONDS")


SwitchDecision = Literal["complete", "roll_back", "wait", "operator"]


@dataclass(frozen=True)
class DestinationReading:
    """What the destination's heartbeat says of the migrating VM (``runs`` None: nothing can be told)."""

    runs: bool | None
    evidence: str


def switching_decision(
    *, runs: bool | None, unknown_since: datetime | None, now: datetime, bound: timedelta
) -> SwitchDecision:
    """What the watchdog does with a stalled ``switching`` migration, given the destination's answer.

    Past the switch the source QEMU may have handed its guest over: rolling back would then leave the
    guest running on a node the records do not name (seen in the soak test when a 'switched' report
    never arrived). So the destination decides, and only a known answer acts: running -> complete,
    not running -> roll back. An unknown answer (Redis unreachable, no heartbeat) waits and is asked
    again on every tick; unknown for ``bound`` since ``unknown_since``, the migration goes to an
    operator (and stays ``switching``: a known answer later still settles it).
    """
    if runs is True:
        return "complete"
    if runs is False:
        return "roll_back"
    if unknown_since is not None and now - unknown_since >= bound:
        return "operator"
    return "wait"


def _settle_switching(client: redis.Redis, migration: Migration, *, now: datetime) -> SwitchDecision:
    """Apply ``switching_decision`` to a locked, stalled ``switching`` migration."""
    reading = _destination_reading(client, migration)
    bound = timedelta(seconds=novacron_setting("MIGRATION_SWITCH_UNKNOWN_TIMEOUT"))
    decision = switching_decision(
        runs=reading.runs, unknown_since=migration.dest_unknown_since, now=now, bound=bound
    )
    dest = migration.dest_node.name
    if decision in ("complete", "roll_back"):
        migration.dest_unknown_since, migration.needs_operator, migration.attention = None, False, ""
        migration.save(update_fields=["dest_unknown_since", "needs_operator", "attention"])
        if decision == "complete":
            detail = f"{dest} runs the VM (no switch report came): {reading.evidence}"
            complete(migration, "watchdog", detail)
        else:
            roll_back(
                migration,
                MigrationStatus.FAILED,
                actor="watchdog",
                detail=f"stalled while switching; {reading.evidence}",
            )
        return decision
    if migration.dest_unknown_since is None:
        migration.dest_unknown_since = now
        migration.save(update_fields=["dest_unknown_since"])
        note(
            migration,
            f"cannot tell whether {dest} runs the VM ({reading.evidence}); not rolling back: asking again "
            f"every tick, for an operator after {int(bound.total_seconds())} s",
        )
    elif decision == "operator" and not migration.needs_operator:
        since = migration.dest_unknown_since
        migration.needs_operator = True
        migration.attention = (
            f"Switching from {migration.source_node.name} to {dest} stalled "
            f"(last progress {_iso(migration.last_progress_at)}) and whether {dest} runs the VM is unknown "
            f"since {_iso(since)}: {reading.evidence}. The source may have handed the guest over, so the "
            f"migration is not rolled back. Check on {dest} whether VM {migration.vm_id} runs (its QEMU's "
            f"query-status) and on {migration.source_node.name} whether its copy is paused (postmigrate); "
            "the watchdog still settles it as soon as the destination's heartbeat answers."
        )[:2000]
        migration.save(update_fields=["needs_operator", "attention"])
        note(migration, f"needs an operator: {reading.evidence} for {int((now - since).total_seconds())} s")
        logger.error("migration %s needs an operator: %s", migration.pk, migration.attention)
    return decision


def _iso(moment: datetime | None) -> str:
    return moment.isoformat(timespec="seconds") if moment else "never"


def _destination_reading(client: redis.Redis, migration: Migration) -> DestinationReading:
    """Read the destination's latest heartbeat for the migrating VM's guest (running, not paused)."""
    dest = migration.dest_node.name
    try:
        raw = client.get(contract.HEARTBEAT_KEY.format(name=dest))
    except redis.RedisError as exc:
        return DestinationReading(None, f"Redis did not answer for {dest}'s heartbeat: {exc}")
    if raw is None:
        # The key has a TTL: its node worker stopped reporting, but its QEMUs outlive it.
        return DestinationReading(None, f"{dest} sends no heartbeat")
    try:
        beat = json.loads(raw)
    except ValueError:
        beat = None
    if not isinstance(beat, dict) or not isinstance(beat.get("vms"), list):
        return DestinationReading(None, f"{dest}'s heartbeat is unreadable")
    entry = next(
        (e for e in beat["vms"] if isinstance(e, dict) and e.get("id") == str(migration.vm_id)), None
    )
    if entry is None:
        return DestinationReading(False, f"{dest}'s heartbeat does not list the VM")
    state = entry.get("node_state")
    return DestinationReading(state == "running", f"{dest}'s heartbeat shows the VM {state}")
