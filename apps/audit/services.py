"""Writes of the audit trail: one event per audited request, and the retention.

``audit_record`` is one INSERT whatever the caller knows: the actor's username and the project's
name are copied by subqueries of that statement (no look-up before it, none when the actor is a
token's memo user). It runs in the caller's transaction state: the API records after the view's
own transactions ended, in autocommit.
"""

import time
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from django.contrib.auth import get_user_model
from django.db import models
from django.db.models import Subquery, Value
from django.db.models.functions import Coalesce

from apps.core.conf import novacron_setting
from apps.core.db import delete_before
from apps.projects.models import Project

from .choices import AuditAction, Outcome
from .models import TARGET_ID_MAX, AuditEvent

PRUNE_BATCH: Final = 10_000  # rows per DELETE: short statements, no long row locks
PRUNE_BUDGET_SECONDS: Final = 60.0  # one run's work at most; the next run carries on


def _copied_name(model: type[models.Model], pk: int | None, field_name: str) -> Any:
    """The ``field_name`` of ``model``'s row ``pk`` as a subquery of the INSERT; "" without one."""
    if pk is None:
        return ""
    names = model._default_manager.filter(pk=pk).values(field_name)[:1]
    return Coalesce(Subquery(names), Value(""))


def audit_record(
    *,
    action: AuditAction,
    actor_id: int | None,
    project_id: int | None,
    target_id: str,
    request_id: str,
    status: int,
    detail: dict[str, Any],
) -> AuditEvent:
    """Write one event; its outcome follows ``status``, its target type ``action``."""
    return AuditEvent.objects.create(
        actor_id=actor_id,
        actor_name=_copied_name(get_user_model(), actor_id, "username"),
        project_id=project_id,
        project_name=_copied_name(Project, project_id, "name"),
        action=action,
        target_type=action.target_type,
        target_id=target_id[:TARGET_ID_MAX],
        request_id=request_id,
        status=status,
        outcome=Outcome.of_status(status),
        detail=detail,
    )


def audit_prune(
    *, now: datetime | None = None, days: int | None = None, budget_seconds: float = PRUNE_BUDGET_SECONDS
) -> int:
    """Delete the events older than ``days`` (default ``AUDIT_RETENTION_DAYS``) in batches, for at
    most ``budget_seconds``; the number deleted."""
    now = now or datetime.now(tz=UTC)
    retention = days if days is not None else novacron_setting("AUDIT_RETENTION_DAYS")
    return delete_before(
        AuditEvent,
        field_name="timestamp",
        cutoff=now - timedelta(days=retention),
        batch=PRUNE_BATCH,
        deadline=time.monotonic() + budget_seconds,
    )
