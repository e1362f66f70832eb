"""The operator page at ``/dashboard/`` (staff): capacity, migrations, alerts and small charts.

Server-rendered with Django templates; ``static/monitoring/dashboard.js`` (plain JS, no build step)
draws the charts as SVG from the embedded data and refreshes everything from ``/dashboard/data/``.
Each migrating VM's name links to its console page; a form opens any VM's (by name or id).
"""

from datetime import timedelta
from typing import Any

import redis
from django.conf import settings
from django.contrib.admin.views.decorators import staff_member_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.utils import timezone

from apps.consoles.pages import console_path
from apps.migrations import progress as migration_progress
from apps.migrations.models import Migration
from apps.streams.links import streams_base

from .selectors import active_migrations, fleet_summary, metric_series, open_alerts

CHART_RANGE = timedelta(hours=1)
CHART_STEP_SECONDS = 60
CHARTS = (
    ("api.requests_per_second", "API requests/s", "avg"),
    ("api.latency_p95_ms", "API latency p95 (ms)", "max"),
    ("api.error_ratio", "API error ratio", "avg"),
    ("db.query_avg_ms", "DB query avg (ms)", "avg"),
    ("node.cpu_percent", "Node CPU % (all nodes)", "avg"),
    ("queue.control.depth", "Control queue depth", "max"),
)
STATUS_STEPS = ("queued", "preparing", "transferring", "switching")


def _migration_row(migration: Migration, client: Any) -> dict[str, Any]:
    live = migration_progress.read(client, str(migration.pk)) if client is not None else {}
    stored = getattr(migration, "percent", None)  # the progress field, where the model has it
    percent = live.get("percent", stored)
    if percent is None and migration.status in STATUS_STEPS:
        percent = 100 * STATUS_STEPS.index(migration.status) / len(STATUS_STEPS)
    return {
        "id": str(migration.pk),
        "vm": migration.vm.name,
        "console": console_path(migration.vm_id),
        "source": migration.source_node.name,
        "dest": migration.dest_node.name,
        "mode": migration.mode,
        "status": migration.status,
        "phase": live.get("phase") or migration.phase or "",
        "percent": round(float(percent or 0), 1),
        "rate_bps": live.get("rate_bps"),
        "eta_seconds": live.get("eta_seconds"),
    }


def dashboard_context() -> dict[str, Any]:
    now = timezone.now()
    client: redis.Redis | None = redis.Redis.from_url(
        settings.REDIS_URL, socket_timeout=2, socket_connect_timeout=2
    )
    try:
        assert client is not None
        client.ping()
    except redis.RedisError:
        client = None  # the page still shows what the database knows
    fleet = fleet_summary()
    charts = []
    for name, title, field in CHARTS:
        points = metric_series(name=name, since=now - CHART_RANGE, until=now, step_seconds=CHART_STEP_SECONDS)
        charts.append(
            {
                "name": name,
                "title": title,
                "points": [[point.start.timestamp(), point.aggregate.of(field)] for point in points],
            }
        )
    return {
        "generated_at": now.isoformat(),
        "totals": fleet["totals"],
        "node_count": fleet["node_count"],
        "vm_count": fleet["vm_count"],
        "vm_states": fleet["vm_states"],
        "nodes": [
            {
                "name": node.name,
                "status": node.status,
                "vcpus": [node.allocated_vcpus, node.vcpus],
                "memory_mb": [node.allocated_memory_mb, node.memory_mb],
                "disk_gb": [node.allocated_disk_gb, node.disk_gb],
            }
            for node in fleet["nodes"]
        ],
        "migrations": [_migration_row(migration, client) for migration in active_migrations()],
        "alerts": [
            {
                "id": alert.pk,
                "rule": alert.rule.name,
                "subject": alert.subject,
                "severity": alert.severity,
                "status": alert.status,
                "value": alert.value,
                "message": alert.message,
                "started_at": alert.started_at.isoformat(),
            }
            for alert in open_alerts()[:100]
        ],
        "charts": charts,
    }


@staff_member_required
def dashboard_page(request: HttpRequest) -> HttpResponse:
    context = {"data": dashboard_context(), "streams_url": streams_base(request)}
    return render(request, "monitoring/dashboard.html", context)


@staff_member_required
def dashboard_data(request: HttpRequest) -> JsonResponse:
    return JsonResponse(dashboard_context())
