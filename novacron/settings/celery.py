"""Celery: Redis broker, JSON only, a ``control`` queue and one ``node.<name>`` queue per node."""

from .cache import REDIS_URL
from .env import env, env_int
from .monitoring import MONITORING

CELERY_BROKER_URL = env("CELERY_BROKER_URL", REDIS_URL, help="Celery broker URL (default: REDIS_URL).")
CELERY_RESULT_BACKEND = None
CELERY_TASK_IGNORE_RESULT = True
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_TASK_DEFAULT_QUEUE = "control"
CELERY_TASK_ROUTES = {"apps.*": {"queue": "control"}}
# At-least-once delivery: a task is acknowledged after it ran, and redelivered when its worker dies.
# Every task is idempotent (state transitions check the current state), so a redelivery is harmless.
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# Redelivery after a crash. With the Redis transport, "unacknowledged" means a copy of the message in
# an ``unacked`` hash; after a SIGKILL (thread pool: the whole worker dies, there is no parent to notice
# a lost child) that copy is put back on its queue only once it is older than ``visibility_timeout``,
# by whichever consumer of the *same hash* sweeps next. Node workers keep the shared default hash and
# a 6 h timeout: their migration tasks may legitimately run that long and must not run twice. The
# control worker's tasks all end within their 60-120 s time limits, so it keeps its unacked copies in
# hashes of its own with a short timeout: a report or batch dispatch lost with a killed control worker
# runs again a few minutes later (found by tests/faults: VMs stayed "provisioning" for 6 h). Every
# control task is idempotent, so a redelivery while a slow original still runs is harmless.
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": env_int(
        "CELERY_CONTROL_VISIBILITY_TIMEOUT",
        300,
        help="Seconds before a control task lost with its worker is redelivered.",
    ),
    "unacked_key": "unacked.control",
    "unacked_index_key": "unacked_index.control",
    "unacked_mutex_key": "unacked_mutex.control",
    # Sweep every 5 s (default: every 10th call of a 10 s timer).
    "unacked_restore_interval": 5,
    "unacked_restore_throttle": 1,
}
# Node workers read CELERY_VISIBILITY_TIMEOUT themselves (workers/node/__main__.py; default 6 h).
CELERY_BEAT_SCHEDULE = {
    "nodes-check-heartbeats": {"task": "apps.vms.tasks.nodes_check_heartbeats", "schedule": 5.0},
    "metrics-flush": {"task": "apps.monitoring.tasks.metrics_flush", "schedule": 10.0},
    "migrations-watchdog": {"task": "apps.migrations.tasks.migrations_watchdog", "schedule": 10.0},
    "images-fetch-watchdog": {"task": "apps.images.fetch_tasks.fetches_watchdog", "schedule": 15.0},
    "migrations-schedule": {"task": "apps.migrations.tasks.migrations_schedule", "schedule": 15.0},
    "api-logs-flush": {
        "task": "apps.monitoring.tasks.api_logs_flush",
        "schedule": MONITORING["API_LOG_FLUSH_INTERVAL"],
    },
    "control-metrics-sample": {"task": "apps.monitoring.tasks.control_metrics_sample", "schedule": 10.0},
    "alerts-evaluate": {"task": "apps.monitoring.tasks.alerts_evaluate", "schedule": 30.0},
    "metrics-prune": {"task": "apps.monitoring.tasks.metrics_prune", "schedule": 300.0},
    "audit-prune": {"task": "apps.audit.tasks.audit_prune", "schedule": 3600.0},
}
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# No task-sent event from senders: Flower follows each task from the worker's received event on,
# and shows queued work as queue lengths. The event would be a second Redis publish per node task.
CELERY_TASK_SEND_SENT_EVENT = False
CELERY_WORKER_SEND_TASK_EVENTS = True
