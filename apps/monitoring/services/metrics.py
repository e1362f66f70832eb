"""Metric samples: node samples drained from Redis, control-plane samples, retention.

Node workers push samples to a capped Redis list; ``metrics_flush`` moves them into ``metrics`` with
one bulk insert. ``control_metrics_sample`` turns the counters the web processes keep in Redis (see
``keys.REQUEST_STATS``) plus queue depths and migrations into rows of the same table, so alerts,
the series API and the dashboard read one place. ``metrics_prune`` enforces the retention.
"""

import json
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import redis

from apps.core.db import delete_before
from apps.migrations.choices import ACTIVE_STATUSES
from apps.migrations.models import Migration
from apps.vms.models import VM, Node
from workers import contract

from .. import selectors
from ..conf import monitoring_setting
from ..keys import API_LOG_DROPPED, API_LOG_LIST, LAST_SAMPLE, LATENCY_BUCKETS_MS, REQUEST_STATS, key
from ..models import APILog, Metric

logger = logging.getLogger(__name__)

FLUSH_MAX = 50_000  # samples per flush; at 10 s per node flush this covers hundreds of nodes


def metrics_flush(*, client: redis.Redis, limit: int = FLUSH_MAX) -> int:
    """Move up to ``limit`` samples from the Redis list into ``metrics`` with one bulk insert."""
    pipe = client.pipeline()
    pipe.lrange(contract.METRICS_LIST, 0, limit - 1)
    pipe.ltrim(contract.METRICS_LIST, limit, -1)
    raw_samples, _ = pipe.execute()
    samples = [sample for sample in (_parse(raw) for raw in raw_samples) if sample is not None]
    if not samples:
        return 0
    nodes = dict(Node.objects.filter(name__in={s["node"] for s in samples}).values_list("name", "pk"))
    vm_ids = {
        str(pk)
        for pk in VM.objects.filter(pk__in={s["vm"] for s in samples if s.get("vm")}).values_list(
            "pk", flat=True
        )
    }
    rows = [
        Metric(
            timestamp=datetime.fromtimestamp(sample["ts"], tz=UTC),
            node_id=nodes.get(sample["node"]),
            vm_id=sample["vm"] if sample.get("vm") in vm_ids else None,
            name=sample["name"],
            value=sample["value"],
        )
        for sample in samples
    ]
    Metric.objects.bulk_create(rows, batch_size=5000)
    return len(rows)


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        sample = json.loads(raw)
        sample["ts"] = float(sample["ts"])
        sample["value"] = float(sample["value"])
        if not isinstance(sample["name"], str) or not isinstance(sample["node"], str):
            raise TypeError("name and node must be strings")
        sample["name"] = sample["name"][:100]
    except (ValueError, KeyError, TypeError) as exc:
        logger.warning("metric sample dropped (%s): %r", exc, raw[:200])
        return None
    return sample


DEFAULT_SAMPLE_INTERVAL = 10.0  # seconds assumed before the first sample (the beat period)
PRUNE_BUDGET_SECONDS = 60.0  # work per retention run; well inside the task's 120 s time limit


def control_metrics_sample(*, client: redis.Redis, now: float | None = None) -> int:
    """Store one sample of the control plane's own metrics; returns the number of rows written.

    Request counters are read and reset in one Redis transaction, so each request counts in
    exactly one sample whatever the number of web processes.
    """
    now = time.time() if now is None else now
    pipe = client.pipeline(transaction=True)
    pipe.hgetall(key(REQUEST_STATS))
    pipe.delete(key(REQUEST_STATS))
    pipe.set(key(LAST_SAMPLE), repr(now), get=True)
    pipe.get(key(API_LOG_DROPPED))
    pipe.llen(key(API_LOG_LIST))
    raw_stats, _, last_sample, dropped, backlog = pipe.execute()
    interval = now - float(last_sample) if last_sample else DEFAULT_SAMPLE_INTERVAL
    if interval <= 0:
        interval = DEFAULT_SAMPLE_INTERVAL
    stats = {field.decode(): int(value) for field, value in raw_stats.items()}
    values: list[tuple[str, float, int | None]] = []  # (name, value, node id)
    requests = stats.get("requests", 0)
    values.append(("api.requests_per_second", requests / interval, None))
    if requests:
        values.append(("api.error_ratio", stats.get("errors", 0) / requests, None))
        values.append(("api.latency_avg_ms", stats.get("duration_us", 0) / 1000 / requests, None))
        values.append(("api.latency_p95_ms", histogram_quantile(0.95, stats), None))
        values.append(("db.queries_per_request", stats.get("db_queries", 0) / requests, None))
    if stats.get("db_queries"):
        values.append(("db.query_avg_ms", stats.get("db_us", 0) / 1000 / stats["db_queries"], None))
    lookups = stats.get("cache_hits", 0) + stats.get("cache_misses", 0)
    if lookups:
        values.append(("cache.hit_ratio", stats.get("cache_hits", 0) / lookups, None))
    values.append(("api.logs_dropped_total", float(int(dropped or 0)), None))
    values.append(("api.logs_backlog", float(backlog), None))
    nodes = dict(Node.objects.values_list("name", "pk"))
    depths = selectors.queue_depths(client, [contract.CONTROL_QUEUE, *map(contract.node_queue, nodes)])
    values.append(("queue.control.depth", float(depths[contract.CONTROL_QUEUE]), None))
    for node_name, node_id in nodes.items():
        values.append(("queue.node.depth", float(depths[contract.node_queue(node_name)]), node_id))
    active = list(Migration.objects.filter(status__in=ACTIVE_STATUSES).values_list("pk", flat=True))
    values.append(("migrations.active", float(len(active)), None))
    waiting = Migration.objects.filter(status__in=ACTIVE_STATUSES, needs_operator=True).count()
    values.append(("migrations.needs_operator", float(waiting), None))
    rates = selectors.migration_live_rates(client, active)
    if rates:
        values.append(("migrations.rate_bytes_per_second", sum(rates.values()), None))
    moved = selectors.migration_wire_bytes(finished_since=datetime.fromtimestamp(now - interval, tz=UTC))
    if moved is not None:
        values.append(("migrations.bytes_per_second", moved / interval, None))
    timestamp = datetime.fromtimestamp(now, tz=UTC)
    Metric.objects.bulk_create(
        [Metric(timestamp=timestamp, name=name, value=value, node_id=node) for name, value, node in values]
    )
    return len(values)


def histogram_quantile(quantile: float, stats: dict[str, int]) -> float:
    """The ``quantile`` of request latency (ms) from the bucket counters, interpolated in its bucket."""
    counts = [stats.get(f"le_{bound}", 0) for bound in LATENCY_BUCKETS_MS] + [stats.get("le_inf", 0)]
    total = sum(counts)
    if not total:
        return 0.0
    target = quantile * total
    seen = 0
    lower = 0.0
    for bound, count in zip(LATENCY_BUCKETS_MS, counts, strict=False):
        if count and seen + count >= target:
            return lower + (bound - lower) * (target - seen) / count
        seen += count
        lower = float(bound)
    return float(LATENCY_BUCKETS_MS[-1])  # in the open-ended bucket: its lower bound is all we know


def metrics_prune(
    *,
    now: datetime | None = None,
    days: int | None = None,
    batch: int | None = None,
    budget_seconds: float = PRUNE_BUDGET_SECONDS,
) -> dict[str, int]:
    """Delete metric samples and API logs older than the retention, ``batch`` rows per statement.

    Stops after ``budget_seconds`` so that one run stays well inside the task's time limit; the next
    beat tick carries on where it stopped.
    """
    now = now or datetime.now(tz=UTC)
    cutoff = now - timedelta(days=days if days is not None else monitoring_setting("METRICS_RETENTION_DAYS"))
    size = batch or monitoring_setting("RETENTION_DELETE_BATCH")
    deadline = time.monotonic() + budget_seconds
    return {
        table: delete_before(model, field_name="timestamp", cutoff=cutoff, batch=size, deadline=deadline)
        for table, model in (("metrics", Metric), ("api_logs", APILog))
    }
