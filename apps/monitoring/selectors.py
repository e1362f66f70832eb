"""Monitoring reads: downsampled metric series, per-window aggregates for alert rules, the dashboard.

Aggregation runs in PostgreSQL (``date_bin`` buckets, ``avg``/``max``/``percentile_cont``). Other
databases (the embedded SQLite) get the same answers computed in Python over a bounded number of
rows, so a development setup works without PostgreSQL-only SQL.
"""

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import redis
from django.db import connection
from django.db.models import Count, FloatField, Q, QuerySet, Sum
from django.db.models.fields.json import KT
from django.db.models.functions import Cast

from apps.core.errors import InvalidInput
from apps.migrations import progress as migration_progress
from apps.migrations.choices import ACTIVE_STATUSES
from apps.migrations.models import Migration
from apps.vms.choices import VMState
from apps.vms.models import VM, Node

from .choices import AlertStatus, Scope
from .conf import monitoring_setting
from .models import Alert, AlertRule, Metric

PERCENTILE = 0.95


@dataclass(frozen=True)
class Aggregate:
    count: int
    avg: float
    max: float
    p95: float

    def of(self, aggregation: str) -> float:
        return float(getattr(self, aggregation))


def percentile(values: list[float], fraction: float) -> float:
    """Linear interpolation between closest ranks: what PostgreSQL's ``percentile_cont`` returns."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    position = fraction * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def aggregate(values: list[float]) -> Aggregate:
    return Aggregate(len(values), sum(values) / len(values), max(values), percentile(values, PERCENTILE))


def _postgres() -> bool:
    return connection.vendor == "postgresql"


# --- series ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeriesPoint:
    start: datetime
    aggregate: Aggregate


def metric_series(
    *,
    name: str,
    since: datetime,
    until: datetime,
    step_seconds: int,
    node: Node | None = None,
    vm: VM | None = None,
) -> list[SeriesPoint]:
    """Samples of ``name`` in [since, until) as one avg/max/p95 per ``step_seconds`` bucket."""
    rows = Metric.objects.filter(name=name, timestamp__gte=since, timestamp__lt=until)
    if node is not None:
        rows = rows.filter(node=node)
    if vm is not None:
        rows = rows.filter(vm=vm)
    if _postgres():
        return _series_postgres(rows, since=since, step_seconds=step_seconds)
    return _series_python(rows, since=since, step_seconds=step_seconds)


def _series_postgres(rows: QuerySet[Metric], *, since: datetime, step_seconds: int) -> list[SeriesPoint]:
    inner, params = rows.values_list("timestamp", "value").query.sql_with_params()
    # ``inner`` is the SQL Django compiled for the filtered queryset; every value is a parameter.
    query = (
        "SELECT date_bin(make_interval(secs => %s), s.ts, %s) AS bucket, count(*), avg(s.v), max(s.v),"  # noqa: S608
        " percentile_cont(%s) WITHIN GROUP (ORDER BY s.v)"
        f" FROM ({inner}) AS s(ts, v) GROUP BY 1 ORDER BY 1"
    )
    with connection.cursor() as cursor:
        cursor.execute(query, [step_seconds, since, PERCENTILE, *params])
        return [
            SeriesPoint(bucket, Aggregate(int(count), float(avg), float(peak), float(p95)))
            for bucket, count, avg, peak, p95 in cursor.fetchall()
        ]


def _series_python(rows: QuerySet[Metric], *, since: datetime, step_seconds: int) -> list[SeriesPoint]:
    limit = monitoring_setting("SERIES_FALLBACK_MAX_ROWS")
    samples = list(rows.order_by("timestamp").values_list("timestamp", "value")[: limit + 1])
    if len(samples) > limit:
        raise InvalidInput(
            f"More than {limit} samples in this range: narrow it, or use PostgreSQL, which aggregates "
            "in the database."
        )
    buckets: dict[int, list[float]] = defaultdict(list)
    for timestamp, value in samples:
        buckets[int((timestamp - since).total_seconds() // step_seconds)].append(value)
    return [
        SeriesPoint(since + timedelta(seconds=index * step_seconds), aggregate(values))
        for index, values in sorted(buckets.items())
    ]


# --- alert rules ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RuleState:
    """One subject of a rule: the aggregate of each window, newest first (None: no samples)."""

    subject: str
    windows: list[Aggregate | None]


def rule_window_count(rule: AlertRule) -> int:
    """How many consecutive windows must breach: the for-duration in windows, at least one."""
    return max(1, math.ceil(rule.for_seconds / max(rule.window_seconds, 1)))


def rule_states(*, rule: AlertRule, now: datetime) -> list[RuleState]:
    """Aggregate ``rule.metric`` per subject over the windows ending at ``now`` (newest is index 0)."""
    windows = rule_window_count(rule)
    width = max(rule.window_seconds, 1)
    start = now - timedelta(seconds=windows * width)
    rows = Metric.objects.filter(name=rule.metric, timestamp__gt=start, timestamp__lte=now)
    if rule.scope == Scope.NODE:
        rows = rows.filter(node__isnull=False)
    elif rule.scope == Scope.VM:
        rows = rows.filter(vm__isnull=False)
    subject_field = {Scope.NODE: "node_id", Scope.VM: "vm_id"}.get(Scope(rule.scope))
    if _postgres():
        grouped = _windows_postgres(rows, subject_field=subject_field, now=now, width=width)
    else:
        grouped = _windows_python(rows, subject_field=subject_field, now=now, width=width)
    names: dict[str, str] = {}
    if rule.scope == Scope.NODE:
        names = {
            str(pk): name for pk, name in Node.objects.filter(pk__in=list(grouped)).values_list("pk", "name")
        }
    states = []
    for subject, by_window in grouped.items():
        label = names.get(subject, subject)
        states.append(RuleState(label, [by_window.get(index) for index in range(windows)]))
    return states


def _windows_postgres(
    rows: QuerySet[Metric], *, subject_field: str | None, now: datetime, width: int
) -> dict[str, dict[int, Aggregate]]:
    fields = ["timestamp", "value"] + ([subject_field] if subject_field else [])
    inner, params = rows.values_list(*fields).query.sql_with_params()
    subject_sql = "s.subject::text" if subject_field else "''"
    columns = "ts, v, subject" if subject_field else "ts, v"
    query = (
        f"SELECT {subject_sql}, floor(extract(epoch FROM (%s - s.ts)) / %s)::int AS window_index,"  # noqa: S608
        " count(*), avg(s.v), max(s.v), percentile_cont(%s) WITHIN GROUP (ORDER BY s.v)"
        f" FROM ({inner}) AS s({columns}) GROUP BY 1, 2"
    )
    grouped: dict[str, dict[int, Aggregate]] = defaultdict(dict)
    with connection.cursor() as cursor:
        cursor.execute(query, [now, width, PERCENTILE, *params])
        for subject, index, count, avg, peak, p95 in cursor.fetchall():
            grouped[subject][int(index)] = Aggregate(int(count), float(avg), float(peak), float(p95))
    return grouped


def _windows_python(
    rows: QuerySet[Metric], *, subject_field: str | None, now: datetime, width: int
) -> dict[str, dict[int, Aggregate]]:
    fields = ["timestamp", "value"] + ([subject_field] if subject_field else [])
    values: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows.values_list(*fields)[: monitoring_setting("SERIES_FALLBACK_MAX_ROWS")]:
        subject = str(row[2]) if subject_field else ""
        values[subject][int((now - row[0]).total_seconds() // width)].append(row[1])
    return {
        subject: {index: aggregate(samples) for index, samples in windows.items()}
        for subject, windows in values.items()
    }


# --- dashboard ------------------------------------------------------------------------------------


def open_alerts() -> QuerySet[Alert]:
    return Alert.objects.exclude(status=AlertStatus.RESOLVED).select_related("rule")


def fleet_summary() -> dict[str, Any]:
    """Capacity of the fleet and of each node, VM counts by state, active migrations."""
    nodes = list(Node.objects.order_by("name"))
    totals = Node.objects.aggregate(
        vcpus=Sum("vcpus"),
        allocated_vcpus=Sum("allocated_vcpus"),
        memory_mb=Sum("memory_mb"),
        allocated_memory_mb=Sum("allocated_memory_mb"),
        disk_gb=Sum("disk_gb"),
        allocated_disk_gb=Sum("allocated_disk_gb"),
        up=Count("id", filter=Q(status="up")),
    )
    vm_states = dict(
        VM.objects.exclude(state=VMState.DELETED).values_list("state").annotate(n=Count("id")).order_by()
    )
    return {
        "nodes": nodes,
        "totals": {key: value or 0 for key, value in totals.items()},
        "node_count": len(nodes),
        "vm_states": vm_states,
        "vm_count": sum(vm_states.values()),
    }


def active_migrations() -> list[Migration]:
    return list(
        Migration.objects.filter(status__in=ACTIVE_STATUSES)
        .select_related("vm", "source_node", "dest_node")
        .order_by("created_at")
    )


def latest_by_node(names: Iterable[str], *, since: datetime) -> dict[tuple[str, str], float]:
    """The newest sample of each node metric in ``names`` since ``since``: {(node, name): value}."""
    rows = (
        Metric.objects.filter(name__in=list(names), node__isnull=False, vm__isnull=True, timestamp__gte=since)
        .order_by("node_id", "name", "-timestamp")
        .values_list("node__name", "name", "value")
    )
    if _postgres():
        return {(node, name): value for node, name, value in rows.distinct("node_id", "name")}
    latest: dict[tuple[str, str], float] = {}
    for node, name, value in rows[: monitoring_setting("SERIES_FALLBACK_MAX_ROWS")]:
        latest.setdefault((node, name), value)
    return latest


# --- Redis and migrations -------------------------------------------------------------------------

# kombu's Redis transport keeps a queue's prioritised messages in sibling lists "<queue>\x06\x16<n>".
_PRIORITY_SEPARATOR = "\x06\x16"
_PRIORITY_STEPS = (3, 6, 9)


def queue_depths(client: redis.Redis, queues: Iterable[str]) -> dict[str, int]:
    """Messages waiting in each Celery queue on the Redis broker (all priority lists), one round trip."""
    names = list(queues)
    pipe = client.pipeline(transaction=False)
    for queue in names:
        pipe.llen(queue)
        for step in _PRIORITY_STEPS:
            pipe.llen(f"{queue}{_PRIORITY_SEPARATOR}{step}")
    lengths = pipe.execute()
    per_queue = len(_PRIORITY_STEPS) + 1
    return {queue: int(sum(lengths[i * per_queue : (i + 1) * per_queue])) for i, queue in enumerate(names)}


def migration_wire_bytes(*, finished_since: datetime | None = None) -> float | None:
    """Bytes DWCP put on the wire for finished migrations (since ``finished_since``); None: none recorded."""
    rows = Migration.objects.filter(stats__has_key="wire_bytes")
    if finished_since is not None:
        rows = rows.filter(finished_at__gt=finished_since)
    wire = Cast(KT("stats__wire_bytes"), FloatField())
    total = rows.annotate(wire=wire).aggregate(total=Sum("wire"))["total"]
    return float(total) if total is not None else None


def migration_live_rates(client: redis.Redis, migration_ids: Iterable[Any]) -> dict[str, float]:
    """The live DWCP rate (bytes/s) of each running migration whose source reports one."""
    rates = {}
    for migration_id in migration_ids:
        live = migration_progress.read(client, str(migration_id))
        if isinstance(live.get("rate_bps"), float):
            rates[str(migration_id)] = live["rate_bps"]
    return rates
