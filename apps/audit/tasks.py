"""Control-queue task of the audit trail: the retention, on beat (idempotent and bounded)."""

from celery import shared_task

from . import services


@shared_task(name="apps.audit.tasks.audit_prune", acks_late=True, time_limit=120, expires=3000)
def audit_prune() -> int:
    """Beat task: delete events older than ``AUDIT_RETENTION_DAYS``, in batches, for at most a minute."""
    return services.audit_prune()
