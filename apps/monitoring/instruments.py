"""Prometheus instruments of the control plane and the per-request counters behind them.

prometheus_client runs in multiprocess mode when ``PROMETHEUS_MULTIPROC_DIR`` is in the environment
(web workers and Celery workers each write their own files there; ``GET /metrics`` merges them), and
in its ordinary single-process mode otherwise. Only counters and histograms are defined here: they
sum correctly across processes, dead ones included (totals must not drop when a worker restarts).

``RequestStats`` collects, for the request being served on this thread or task, the database time
and cache hits the middleware reports once the response is ready.
"""

import atexit
import contextvars
import functools
import os
import time
from dataclasses import dataclass
from typing import Any

from celery import signals as celery_signals
from prometheus_client import Counter, Histogram

from .keys import LATENCY_BUCKETS_MS

LATENCY_BUCKETS_SECONDS = tuple(bound / 1000 for bound in LATENCY_BUCKETS_MS)
DB_BUCKETS_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
TASK_BUCKETS_SECONDS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 1800.0, 7200.0)

http_request_duration = Histogram(
    "novacron_http_request_duration_seconds",
    "Time to answer an HTTP request, by route pattern.",
    ["method", "endpoint"],
    buckets=LATENCY_BUCKETS_SECONDS,
)
http_requests = Counter(
    "novacron_http_requests",
    "HTTP requests answered, by route pattern and status.",
    ["method", "endpoint", "status"],
)
http_response_bytes = Counter(
    "novacron_http_response_bytes", "Bytes of HTTP response bodies.", ["method", "endpoint"]
)
db_query_duration = Histogram(
    "novacron_db_query_duration_seconds",
    "Time of each database query made while answering a request.",
    buckets=DB_BUCKETS_SECONDS,
)
cache_requests = Counter("novacron_cache_requests", "Cache look-ups by result.", ["result"])
api_log_send_failures = Counter(
    "novacron_api_log_send_failures", "API log entries lost because Redis did not answer."
)
celery_tasks = Counter(
    "novacron_celery_tasks", "Celery tasks finished, by name and state.", ["task", "state"]
)
celery_task_duration = Histogram(
    "novacron_celery_task_duration_seconds",
    "Run time of Celery tasks, by name.",
    ["task"],
    buckets=TASK_BUCKETS_SECONDS,
)


@dataclass
class RequestStats:
    db_queries: int = 0
    db_seconds: float = 0.0
    cache_hits: int = 0
    cache_misses: int = 0


current_request: contextvars.ContextVar[RequestStats | None] = contextvars.ContextVar(
    "novacron_request_stats", default=None
)


@functools.lru_cache(maxsize=4096)
def labelled(metric: Any, **labels: str) -> Any:
    """``metric.labels(**labels)``, kept: label sets are few (routes, methods, statuses, views), and
    ``labels()`` takes a lock and builds its key on every call (five per cached read)."""
    return metric.labels(**labels)


def record_cache_lookup(*, hit: bool) -> None:
    labelled(cache_requests, result="hit" if hit else "miss").inc()
    stats = current_request.get()
    if stats is not None:
        if hit:
            stats.cache_hits += 1
        else:
            stats.cache_misses += 1


def record_db_query(seconds: float) -> None:
    db_query_duration.observe(seconds)
    stats = current_request.get()
    if stats is not None:
        stats.db_queries += 1
        stats.db_seconds += seconds


# Celery: task counts and durations, from the worker's own signals (start times keyed by task id).
_task_started: dict[str, float] = {}


@celery_signals.task_prerun.connect
def _on_task_prerun(task_id: str | None = None, **_: Any) -> None:
    if task_id:
        _task_started[task_id] = time.perf_counter()


@celery_signals.task_postrun.connect
def _on_task_postrun(
    task_id: str | None = None, task: Any = None, state: str | None = None, **_: Any
) -> None:
    started = _task_started.pop(task_id or "", None)
    name = getattr(task, "name", None) or "unknown"
    celery_tasks.labels(task=name, state=state or "UNKNOWN").inc()
    if started is not None:
        celery_task_duration.labels(task=name).observe(time.perf_counter() - started)


def _mark_process_dead() -> None:
    """Let live gauges of an exiting process go (counters and histograms keep their totals)."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory and os.path.isdir(directory):
        from prometheus_client import multiprocess  # noqa: PLC0415  (only meaningful in this mode)

        multiprocess.mark_process_dead(os.getpid(), directory)


atexit.register(_mark_process_dead)
celery_signals.worker_process_shutdown.connect(lambda **_: _mark_process_dead(), weak=False)
