"""Control-queue tasks of migrations: scheduling, node reports, the stall watchdog."""

from typing import Any

from celery import shared_task

from workers import contract

from . import services


@shared_task(name="apps.migrations.tasks.migrations_schedule", acks_late=True, time_limit=60)
def migrations_schedule() -> list[str]:
    """Start queued migrations within the per-node limits (after each request and end, and on beat)."""
    return services.migrations_schedule()


@shared_task(name=contract.CONTROL_MIGRATION_REPORT, acks_late=True, time_limit=60)
def migration_report(
    *,
    migration_id: str,
    node: str,
    role: str,
    event: str,
    detail: str = "",
    stats: dict[str, Any] | None = None,
    targets: dict[str, str] | None = None,
) -> None:
    """A node reports a step of a migration."""
    services.migration_report(
        migration_id=migration_id,
        node=node,
        role=role,
        event=event,
        detail=detail,
        stats=stats,
        targets=targets,
    )


@shared_task(name="apps.migrations.tasks.migrations_watchdog", acks_late=True, time_limit=60, expires=20)
def migrations_watchdog() -> list[str]:
    """Beat task: fail migrations whose progress stopped moving."""
    return services.migrations_watchdog()
