"""Alert webhooks: the payload of an alert's firing or resolution (sent by ``apps.core.webhooks``,
signed with ``ALERT_WEBHOOK_SECRET``)."""

from typing import Any

from .models import Alert


def alert_payload(alert: Alert, event: str) -> dict[str, Any]:
    return {
        "event": event,
        "alert": {
            "id": alert.pk,
            "rule": alert.rule.name,
            "metric": alert.rule.metric,
            "subject": alert.subject,
            "status": alert.status,
            "severity": alert.severity,
            "value": alert.value,
            "threshold": alert.rule.threshold,
            "message": alert.message,
            "started_at": alert.started_at.isoformat(),
            "resolved_at": alert.resolved_at.isoformat() if alert.resolved_at else None,
        },
    }
