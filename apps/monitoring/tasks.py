"""Control-queue tasks of monitoring."""

import redis
from celery import shared_task
from django.conf import settings

from . import services


@shared_task(name="apps.monitoring.tasks.metrics_flush", acks_late=True, time_limit=60, expires=20)
def metrics_flush() -> int:
    """Beat task: drain node metric samples from Redis into PostgreSQL (one bulk insert)."""
    return services.metrics_flush(client=redis.Redis.from_url(settings.REDIS_URL, socket_timeout=5))
