"""The ``on_no_convergence`` policy: what a live migration's "no" convergence verdict leads to.

The source's forecast (``workers.node.migration.forecast``) reports its verdict when it changes, and
at every new RAM pass while it is "no". Each change is recorded in the migration's history with its
reason; on a "no" the migration's policy acts through the operator's own paths: ``keep`` leaves it to
auto-converge (on for every live migration), ``force_complete_after`` N forces completion from pass
N on (``migration_force_complete``: pause-and-copy), ``cancel`` cancels it (``migration_cancel``: the
VM stays on its source). Called with the migration's row locked, from the report reducer.
"""

from apps.core.errors import InvalidState
from workers import contract

from ..choices import OnNoConvergence
from ..models import Migration, MigrationEvent
from .control import migration_cancel, migration_force_complete
from .state import note

POLICY_ACTOR = "policy on_no_convergence"
FORCED_DETAIL = "force-complete requested"  # what migration_force_complete records


def migration_forecast(
    migration: Migration, *, verdict: contract.Converging, reason: str, passes: int, actor: str
) -> None:
    """Record a verdict that changed; on "no", apply the migration's policy (once)."""
    recorded = _last_verdict(migration)
    if verdict != recorded:
        note(migration, f"converging {verdict} (RAM pass {passes}): {reason}", actor=actor)
    if verdict != "no":
        return
    policy = OnNoConvergence(migration.on_no_convergence)
    if policy == OnNoConvergence.KEEP:
        if verdict != recorded:
            note(
                migration,
                "on_no_convergence keep: auto-converge throttles the guest; trying on",
                actor=POLICY_ACTOR,
            )
    elif policy == OnNoConvergence.CANCEL:
        if not migration.cancel_requested:
            note(migration, f"on_no_convergence cancel: cancelling ({reason})", actor=POLICY_ACTOR)
            migration_cancel(migration=migration, actor=POLICY_ACTOR)
    else:
        after = migration.force_complete_after_passes or 1
        forced = migration.events.filter(actor=POLICY_ACTOR, detail=FORCED_DETAIL).exists()
        if passes < after:
            if verdict != recorded:
                note(
                    migration,
                    f"on_no_convergence force_complete_after {after}: waiting for pass {after}",
                    actor=POLICY_ACTOR,
                )
        elif not forced:
            note(
                migration,
                f"on_no_convergence force_complete_after {after}: forcing at pass {passes} ({reason})",
                actor=POLICY_ACTOR,
            )
            try:
                migration_force_complete(migration=migration, actor=POLICY_ACTOR)
            except InvalidState as exc:  # the memory phase's report not yet applied: the next pass retries
                note(
                    migration,
                    f"on_no_convergence: force-complete not possible yet: {exc.message}",
                    actor=POLICY_ACTOR,
                )


def _last_verdict(migration: Migration) -> str:
    """The verdict the history last recorded ("unknown" before any)."""
    detail = (
        MigrationEvent.objects.filter(migration=migration, detail__startswith="converging ")
        .order_by("-at", "-id")
        .values_list("detail", flat=True)
        .first()
    )
    return detail.split()[1] if detail else "unknown"
