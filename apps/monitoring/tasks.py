"""Control-queue tasks of monitoring: flushes and samples on beat, alert evaluation, webhooks.

Every task is idempotent and bounded: beat runs them again on its next tick, and ``expires`` drops
a tick that waited in the queue longer than its period.
"""

import urllib.error

import redis
from celery import shared_task
from django.conf import settings

from apps.core.webhooks import webhook_post

from . import services
from .conf import monitoring_setting
from .models import Alert
from .webhooks import alert_payload


def _redis() -> redis.Redis:
    return redis.Redis.from_url(settings.REDIS_URL, socket_timeout=5)


@shared_task(name="apps.monitoring.tasks.metrics_flush", acks_late=True, time_limit=60, expires=20)
def metrics_flush() -> int:
    """Beat task: drain node metric samples from Redis into PostgreSQL (one bulk insert)."""
    return services.metrics_flush(client=_redis())


@shared_task(name="apps.monitoring.tasks.api_logs_flush", acks_late=True, time_limit=60, expires=30)
def api_logs_flush() -> int:
    """Beat task: write the API log entries buffered in Redis, one bulk INSERT per batch."""
    return services.api_logs_flush(client=_redis())


@shared_task(name="apps.monitoring.tasks.control_metrics_sample", acks_late=True, time_limit=30, expires=10)
def control_metrics_sample() -> int:
    """Beat task: store request, database, cache, queue and migration metrics as metric rows."""
    return services.control_metrics_sample(client=_redis())


@shared_task(name="apps.monitoring.tasks.metrics_prune", acks_late=True, time_limit=120, expires=240)
def metrics_prune() -> dict[str, int]:
    """Beat task: delete samples and API logs older than the retention, in batches, for at most a minute."""
    return services.metrics_prune()


@shared_task(name="apps.monitoring.tasks.alerts_evaluate", acks_late=True, time_limit=60, expires=25)
def alerts_evaluate() -> dict[str, int]:
    """Beat task: evaluate every alert rule; fire and resolve alerts."""
    return services.alerts_evaluate()


@shared_task(
    name="apps.monitoring.tasks.alert_webhook_send",
    acks_late=True,
    time_limit=30,
    autoretry_for=(urllib.error.URLError, OSError),
    retry_backoff=5,
    max_retries=5,
)
def alert_webhook_send(*, alert_id: int, event: str) -> int | None:
    """POST an alert's firing or resolution to ``ALERT_WEBHOOK_URL`` (signed), retrying on failure."""
    url = monitoring_setting("ALERT_WEBHOOK_URL")
    if not url:
        return None
    alert = Alert.objects.select_related("rule").filter(pk=alert_id).first()
    if alert is None:
        return None
    return webhook_post(
        url=url,
        secret=monitoring_setting("ALERT_WEBHOOK_SECRET"),
        payload=alert_payload(alert, event),
        agent="NovaCron-alerts",
    )
