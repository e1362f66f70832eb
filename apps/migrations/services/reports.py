"""Node reports of a migration, reduced by a table of (status, event) -> handler.

Each step of a migration is a node task (prepare on the destination, send on the source, finish on
the destination, cleanup on the source) whose report moves the migration on: ``REDUCER`` names the
handler of each report a status accepts. A pair it does not list is a report that no longer applies
(a late or repeated one): it is logged and dropped, so applying a report twice changes nothing.
"""

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final, Unpack

from django.db import transaction

from apps.core.errors import InvalidState
from workers import contract

from .. import progress
from ..choices import ACTIVE_STATUSES, TERMINAL_STATUSES, MigrationMode, MigrationPhase, MigrationStatus
from ..models import Migration
from . import node_tasks
from .convergence import migration_forecast
from .outcomes import complete, late_failure, roll_back
from .state import forget_progress, note, record_phase, redis_client, transition

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Report:
    """A node's report as the handlers read it, the contract's defaults applied."""

    node: str
    role: contract.Role
    event: contract.ReportEvent
    detail: str
    targets: contract.Targets
    cause: contract.FailureCause
    stats: contract.MigrationStats

    @property
    def actor(self) -> str:
        return f"node {self.node}"

    @property
    def side(self) -> str:
        """Who reported, as the history and errors name it."""
        return f"{self.role} {self.node}"


Handler = Callable[[Migration, Report], None]


@transaction.atomic
def migration_report(**report: Unpack[contract.MigrationReport]) -> None:
    """Apply a node's report. Idempotent: a report that no longer fits the state is logged and dropped.

    A failure is reported by both sides in either order: the first rolls back, a later one is recorded
    in the history and becomes the error when its cause ranks higher (``contract.FAILURE_CAUSES``).
    """
    migration_id, node, role, event = report["migration_id"], report["node"], report["role"], report["event"]
    migration = (
        Migration.objects.select_for_update(of=("self",))
        .select_related("vm", "vm__image", "vm__node", "source_node", "dest_node")
        .filter(pk=migration_id)
        .first()
    )
    if migration is None:
        logger.warning("report %s for unknown migration %s from %s ignored", event, migration_id, node)
        return
    expected = migration.source_node if role == "source" else migration.dest_node
    if expected.name != node:
        logger.warning(
            "migration %s: %s report from %s, expected %s; ignored", migration_id, role, node, expected
        )
        return
    stats = report.get("stats")
    if stats:
        merged = {**migration.stats, **stats}
        stopped, resumed = merged.get("source_stopped_at"), merged.get("dest_resumed_at")
        if isinstance(stopped, (int, float)) and isinstance(resumed, (int, float)):
            # What the guest lived through: source CPUs stopped -> destination CPUs resumed (QMP event times).
            merged["guest_pause_ms"] = round((resumed - stopped) * 1000, 1)
        migration.stats = merged
        migration.save(update_fields=["stats"])
    status = MigrationStatus(migration.status)
    handler = REDUCER.get((status, event), _after_end if status in TERMINAL_STATUSES else _not_applicable)
    handler(
        migration,
        Report(
            node=node,
            role=role,
            event=event,
            detail=report.get("detail", ""),
            targets=report.get("targets") or {},
            cause=report.get("cause", "error"),
            stats=stats or {},
        ),
    )


def _prepared(migration: Migration, report: Report) -> None:
    """The destination waits: the source may send (unless a cancel came meanwhile)."""
    if migration.cancel_requested:
        roll_back(migration, MigrationStatus.CANCELLED, actor="system", detail="cancelled while preparing")
        return
    try:
        tickets = node_tasks.tickets(migration, report.targets)
    except InvalidState as exc:
        roll_back(migration, MigrationStatus.FAILED, actor="system", detail=exc.message)
        return
    transition(
        migration,
        MigrationStatus.TRANSFERRING,
        actor=report.actor,
        detail="destination ready",
        phase=MigrationPhase.DISK,
    )
    progress.set_control(
        redis_client(), str(migration.pk), bandwidth_limit_mbps=migration.bandwidth_limit_mbps
    )
    node_tasks.send_transfer(migration, report.targets, tickets)


def _phase(migration: Migration, report: Report) -> None:
    record_phase(migration, report.detail, actor=report.actor)


def _transferred(migration: Migration, report: Report) -> None:
    """The source sent everything (live: its guest is paused): the switch begins."""
    transition(
        migration, MigrationStatus.SWITCHING, actor=report.actor, detail=report.detail or "transfer complete"
    )
    if migration.mode == MigrationMode.COLD:
        node_tasks.send_finish(migration)


def _switched(migration: Migration, report: Report) -> None:
    """The destination runs (or holds) the VM: the migration completes."""
    if migration.status == MigrationStatus.TRANSFERRING:
        transition(migration, MigrationStatus.SWITCHING, actor=report.actor, detail="destination took over")
    complete(migration, report.actor, report.detail)


def _forecast(migration: Migration, report: Report) -> None:
    """The source's convergence verdict: recorded, and acted on by the migration's policy."""
    stats = report.stats
    verdict = stats.get("converging", "unknown")
    if verdict == "unknown":
        return
    migration_forecast(
        migration,
        verdict=verdict,
        reason=stats.get("converging_reason", report.detail),
        passes=int(stats.get("memory_passes", 0)),
        actor=report.actor,
    )


def _cancelled(migration: Migration, report: Report) -> None:
    roll_back(migration, MigrationStatus.CANCELLED, actor=report.actor, detail=report.detail or "cancelled")


def _failed(migration: Migration, report: Report) -> None:
    if migration.cancel_requested:
        # Cancelling breaks the transfer, and the side that notices first reports a failure: it is
        # still the cancel the operator asked for.
        detail = f"cancelled ({report.side}: {report.detail})"
        roll_back(migration, MigrationStatus.CANCELLED, actor=report.actor, detail=detail)
        return
    detail = f"{report.side}: {report.detail}"
    roll_back(migration, MigrationStatus.FAILED, actor=report.actor, detail=detail, cause=report.cause)


def _failed_after_end(migration: Migration, report: Report) -> None:
    late_failure(migration, actor=report.actor, detail=f"{report.side}: {report.detail}", cause=report.cause)


def _noted(migration: Migration, report: Report) -> None:
    """A side removed its copy, or kept one for an operator: history only, in any status."""
    note(migration, f"{report.role} {report.event}: {report.detail}", actor=report.actor)


def _after_end(migration: Migration, report: Report) -> None:
    logger.info(
        "migration %s is %s; late %s report from %s ignored",
        migration.pk,
        migration.status,
        report.event,
        report.node,
    )
    if report.role == "source":  # the source's last word comes after its last progress write
        forget_progress(migration)


def _not_applicable(migration: Migration, report: Report) -> None:
    logger.info(
        "migration %s (%s): %s report from %s does not apply; ignored",
        migration.pk,
        migration.status,
        report.event,
        report.node,
    )


def _rows(
    statuses: Iterable[MigrationStatus], events: Iterable[contract.ReportEvent], handler: Handler
) -> dict[tuple[MigrationStatus, contract.ReportEvent], Handler]:
    return {(status, event): handler for status in statuses for event in events}


S = MigrationStatus
# (status, event) -> handler. Not listed: the report no longer applies (``_after_end`` once the
# migration ended, ``_not_applicable`` before).
REDUCER: Final[dict[tuple[MigrationStatus, contract.ReportEvent], Handler]] = {
    (S.PREPARING, "prepared"): _prepared,
    (S.TRANSFERRING, "transferred"): _transferred,
    (S.TRANSFERRING, "switched"): _switched,  # live: it can overtake the source's "transferred"
    (S.SWITCHING, "switched"): _switched,
    (S.TRANSFERRING, "forecast"): _forecast,
    **_rows(ACTIVE_STATUSES, ["phase"], _phase),
    **_rows(ACTIVE_STATUSES, ["cancelled"], _cancelled),
    **_rows(ACTIVE_STATUSES, ["failed"], _failed),
    **_rows(TERMINAL_STATUSES, ["failed"], _failed_after_end),
    **_rows(MigrationStatus, ["aborted", "cleaned", "kept"], _noted),
}
del S
