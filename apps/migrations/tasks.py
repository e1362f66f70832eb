"""Control-queue tasks of migrations: scheduling, node reports and copies, the stall watchdog, webhooks."""

import urllib.error
from typing import Unpack

from celery import shared_task

from apps.core.conf import novacron_setting
from apps.core.webhooks import webhook_post
from workers import contract

from . import services
from .models import MigrationEvent
from .serializers import webhook_payload


@shared_task(name="apps.migrations.tasks.migrations_schedule", acks_late=True, time_limit=60)
def migrations_schedule() -> list[str]:
    """Start queued migrations within the per-node limits (after each request and end, and on beat)."""
    return services.migrations_schedule()


@shared_task(name=contract.CONTROL_MIGRATION_REPORT, acks_late=True, time_limit=60)
def migration_report(**report: Unpack[contract.MigrationReport]) -> None:
    """A node reports a step of a migration."""
    services.migration_report(**report)


@shared_task(name=contract.CONTROL_MIGRATION_COPIES, acks_late=True, time_limit=60)
def migration_copies(**copies: Unpack[contract.MigrationCopies]) -> list[str]:
    """A starting node lists its destination copies: name back those whose migration ended."""
    return services.node_migration_copies(**copies)


@shared_task(name="apps.migrations.tasks.migrations_watchdog", acks_late=True, time_limit=60, expires=20)
def migrations_watchdog() -> list[str]:
    """Beat task: fail migrations whose progress stopped moving."""
    return services.migrations_watchdog()


@shared_task(
    name="apps.migrations.tasks.migration_webhook_send",
    acks_late=True,
    time_limit=30,
    autoretry_for=(urllib.error.URLError, OSError),
    retry_backoff=5,
    max_retries=5,
)
def migration_webhook_send(*, event_id: int) -> int | None:
    """POST one recorded state change to ``MIGRATION_WEBHOOK_URL`` (signed), retrying on failure.

    One task per change: a retried one can arrive after a later change, so receivers order by the
    payload's ``event.id`` (increasing) or ``event.at``.
    """
    url = novacron_setting("MIGRATION_WEBHOOK_URL")
    if not url:
        return None
    related = ("migration__vm", "migration__source_node", "migration__dest_node")
    event = MigrationEvent.objects.select_related(*related).filter(pk=event_id).first()
    if event is None:
        return None
    return webhook_post(
        url=url,
        secret=novacron_setting("MIGRATION_WEBHOOK_SECRET"),
        payload=webhook_payload(event),
        agent="NovaCron-migrations",
    )
