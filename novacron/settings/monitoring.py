"""Monitoring: API-log buffering, metric retention, alert webhook and the Prometheus endpoint.

Options live under ``MONITORING`` (read through ``apps.monitoring.conf.monitoring_setting``).
``PROMETHEUS_MULTIPROC_DIR`` is read by prometheus_client itself when it is imported, so it must be
in the process environment (``make run`` sets and empties it); it is read here so that it is
documented and so that the directory exists.
"""

from pathlib import Path

from .cache import CACHES
from .env import env, env_int

PROMETHEUS_MULTIPROC_DIR = env(
    "PROMETHEUS_MULTIPROC_DIR",
    "",
    help="Directory of prometheus_client's per-process files (shared by the web workers and Celery).",
)
if PROMETHEUS_MULTIPROC_DIR:
    Path(PROMETHEUS_MULTIPROC_DIR).mkdir(parents=True, exist_ok=True)

MONITORING = {
    # API logs travel through a Redis list; when it holds this many entries new ones are dropped
    # (and counted) rather than letting Redis grow without bound while the control worker is down.
    "API_LOG_BUFFER_MAX": env_int(
        "API_LOG_BUFFER_MAX", 100_000, help="Most API log entries buffered in Redis before drops."
    ),
    # Seconds between pushes of a web process's buffered API log entries to Redis (one round trip per
    # batch); 0 pushes each entry from its request.
    "API_LOG_PUSH_INTERVAL": 0.05,
    "API_LOG_FLUSH_BATCH": env_int(
        "API_LOG_FLUSH_BATCH", 2000, help="API log rows written by one bulk INSERT."
    ),
    "API_LOG_FLUSH_INTERVAL": env(
        "API_LOG_FLUSH_INTERVAL", 5.0, cast=float, help="Seconds between API log flushes (beat)."
    ),
    "METRICS_RETENTION_DAYS": env_int(
        "METRICS_RETENTION_DAYS", 14, help="Days metric samples and API logs are kept."
    ),
    "RETENTION_DELETE_BATCH": 10_000,  # rows per DELETE: short statements, no long row locks
    "SERIES_MAX_POINTS": 2000,  # buckets one /metrics/ series may return
    "SERIES_FALLBACK_MAX_ROWS": 200_000,  # rows aggregated in Python where SQL cannot (SQLite)
    "ALERT_WEBHOOK_URL": env(
        "ALERT_WEBHOOK_URL", "", help="URL that receives a JSON POST when an alert fires or resolves."
    ),
    "ALERT_WEBHOOK_SECRET": env(
        "ALERT_WEBHOOK_SECRET", "", help="HMAC-SHA256 key signing alert webhooks (X-NovaCron-Signature)."
    ),
    "METRICS_TOKEN": env(
        "METRICS_TOKEN", "", help="Bearer token Prometheus presents at /metrics (staff sessions also pass)."
    ),
}

# The default cache counts its hits and misses (Prometheus and the cache.hit_ratio metric).
CACHES["default"]["BACKEND"] = "apps.monitoring.cache.InstrumentedRedisCache"
