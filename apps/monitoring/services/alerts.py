"""Alert rules in action: evaluation, the firing -> acknowledged -> resolved lifecycle, webhooks.

A rule breaches for a subject (the control plane, a node or a VM) when its aggregation of the metric
crosses the threshold in *every* window-sized slice of the last ``for_seconds`` (each slice must
hold samples: no data is no evidence). That fires one alert per rule and subject (a partial unique
constraint guarantees it). The alert resolves when the newest window no longer breaches, or has no
samples. Evaluation is stateless: running it twice at the same instant changes nothing.
"""

import logging
import operator
from collections.abc import Callable
from datetime import datetime

from django.contrib.auth.models import User
from django.db import IntegrityError, transaction
from django.utils import timezone

from apps.core.errors import InvalidState

from ..choices import AlertStatus, Comparison
from ..models import Alert, AlertRule
from ..selectors import Aggregate, RuleState, rule_states

logger = logging.getLogger(__name__)

COMPARE: dict[str, Callable[[float, float], bool]] = {
    Comparison.GT: operator.gt,
    Comparison.GTE: operator.ge,
    Comparison.LT: operator.lt,
    Comparison.LTE: operator.le,
}
SYMBOL = dict(Comparison.choices)


def _breaches(rule: AlertRule, window: Aggregate | None) -> bool:
    return window is not None and COMPARE[rule.comparison](window.of(rule.aggregation), rule.threshold)


def _message(rule: AlertRule, subject: str, value: float) -> str:
    where = f" on {subject}" if subject else ""
    return (
        f"{rule.name}{where}: {rule.aggregation}({rule.metric}) = {value:.4g} "
        f"{SYMBOL[rule.comparison]} {rule.threshold:.4g} for {rule.for_seconds} s"
    )[:500]


def alerts_evaluate(*, now: datetime | None = None) -> dict[str, int]:
    """Evaluate every rule at ``now``; returns how many alerts fired and resolved."""
    now = now or timezone.now()
    counts = {"fired": 0, "resolved": 0}
    for rule in AlertRule.objects.all():
        states = rule_states(rule=rule, now=now) if rule.enabled else []
        fired, resolved = _apply(rule, states, now=now)
        counts["fired"] += fired
        counts["resolved"] += resolved
    return counts


@transaction.atomic
def _apply(rule: AlertRule, states: list[RuleState], *, now: datetime) -> tuple[int, int]:
    open_alerts = {
        alert.subject: alert
        for alert in Alert.objects.select_for_update().filter(rule=rule).exclude(status=AlertStatus.RESOLVED)
    }
    by_subject = {state.subject: state for state in states}
    fired = resolved = 0
    for subject, state in by_subject.items():
        newest = state.windows[0]
        alert = open_alerts.get(subject)
        if alert is None and all(_breaches(rule, window) for window in state.windows):
            assert newest is not None
            value = newest.of(rule.aggregation)
            try:
                with transaction.atomic():
                    alert = Alert.objects.create(
                        rule=rule,
                        subject=subject,
                        severity=rule.severity,
                        value=value,
                        message=_message(rule, subject, value),
                        started_at=now,
                    )
            except IntegrityError:  # another evaluation fired it a moment ago
                continue
            fired += 1
            _notify(alert, "firing")
        elif alert is not None and _breaches(rule, newest):
            assert newest is not None
            alert.value = newest.of(rule.aggregation)
            alert.save(update_fields=["value"])
    for subject, alert in open_alerts.items():
        current = by_subject.get(subject)
        if current is None or not _breaches(rule, current.windows[0]):
            alert.status = AlertStatus.RESOLVED
            alert.resolved_at = now
            alert.save(update_fields=["status", "resolved_at"])
            resolved += 1
            _notify(alert, "resolved")
    return fired, resolved


def _notify(alert: Alert, event: str) -> None:
    from ..conf import monitoring_setting  # noqa: PLC0415
    from ..tasks import alert_webhook_send  # noqa: PLC0415  (tasks import services)

    if monitoring_setting("ALERT_WEBHOOK_URL"):
        alert_id = alert.pk
        transaction.on_commit(lambda: alert_webhook_send.delay(alert_id=alert_id, event=event))
    logger.warning("alert %s: %s", event, alert.message)


@transaction.atomic
def alert_acknowledge(*, alert: Alert, user: User) -> Alert:
    """firing -> acknowledged (acknowledging again changes nothing); a resolved alert is final."""
    alert = Alert.objects.select_for_update().get(pk=alert.pk)
    if alert.status == AlertStatus.RESOLVED:
        raise InvalidState(f"Alert {alert.pk} is resolved; there is nothing to acknowledge.")
    if alert.status == AlertStatus.FIRING:
        alert.status = AlertStatus.ACKNOWLEDGED
        alert.acknowledged_at = timezone.now()
        alert.acknowledged_by = user
        alert.save(update_fields=["status", "acknowledged_at", "acknowledged_by"])
    return alert
