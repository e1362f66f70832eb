"""Monitoring writes, split by entity: API logs, metric samples, alerts."""

from .alerts import alert_acknowledge, alerts_evaluate
from .api_logs import api_logs_flush
from .metrics import control_metrics_sample, metrics_flush, metrics_prune

__all__ = [
    "alert_acknowledge",
    "alerts_evaluate",
    "api_logs_flush",
    "control_metrics_sample",
    "metrics_flush",
    "metrics_prune",
]
