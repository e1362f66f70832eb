"""``GET /metrics``: the Prometheus text exposition of the whole control plane.

With ``PROMETHEUS_MULTIPROC_DIR`` set, the counters and histograms of every process that wrote
files under it (web workers, Celery workers; subdirectories included, so containers sharing a volume
can keep one subdirectory each) are merged; without it, this process's own registry is served.
Figures that live elsewhere (queue depths and dropped logs in Redis; nodes and migrations in the
database) are read at scrape time by :class:`ControlPlaneCollector`.

Access: ``Authorization: Bearer <METRICS_TOKEN>`` (for Prometheus) or a staff session.
"""

import glob
import hmac
import logging
import os
from collections.abc import Iterator
from datetime import timedelta

import redis
from django.conf import settings
from django.db.models import Count
from django.http import HttpRequest, HttpResponse
from django.utils import timezone
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

from apps.migrations.choices import ACTIVE_STATUSES
from apps.migrations.models import Migration
from apps.vms.choices import NodeStatus
from apps.vms.models import Node
from workers import contract

from .conf import monitoring_setting
from .keys import API_LOG_DROPPED, API_LOG_LIST, key
from .selectors import latest_by_node, migration_live_rates, migration_wire_bytes, queue_depths

logger = logging.getLogger(__name__)

NODE_METRICS = ("node.cpu_percent", "node.memory_used_bytes", "node.memory_percent", "node.disk_percent")
NODE_METRIC_MAX_AGE = timedelta(minutes=2)  # older samples mean a silent node: not shown as current


class MultiProcessFiles:
    """prometheus_client's multiprocess merge over every ``*.db`` file below a directory."""

    def __init__(self, path: str) -> None:
        self.path = path

    def collect(self) -> Iterator[Metric]:
        files = glob.glob(os.path.join(self.path, "**", "*.db"), recursive=True)
        return iter(MultiProcessCollector.merge(files, accumulate=True))


class ControlPlaneCollector:
    """Gauges read at scrape time from Redis and the database."""

    def collect(self) -> Iterator[Metric]:
        yield from self._redis_figures()
        yield from self._nodes()
        yield from self._migrations()

    def _redis_figures(self) -> Iterator[Metric]:
        client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=2, socket_connect_timeout=2)
        try:
            depth = GaugeMetricFamily(
                "novacron_queue_depth", "Messages waiting in a Celery queue.", labels=["queue"]
            )
            names = Node.objects.values_list("name", flat=True)
            for queue, count in queue_depths(
                client, [contract.CONTROL_QUEUE, *map(contract.node_queue, names)]
            ).items():
                depth.add_metric([queue], count)
            dropped = int(client.get(key(API_LOG_DROPPED)) or 0)
            backlog = client.llen(key(API_LOG_LIST))
        except redis.RedisError as exc:
            logger.warning("metrics: Redis figures unavailable: %s", exc)
            return
        yield depth
        yield CounterMetricFamily(
            "novacron_api_log_dropped", "API log entries refused because the buffer was full.", value=dropped
        )
        yield GaugeMetricFamily(
            "novacron_api_log_backlog", "API log entries waiting to be written.", value=backlog
        )

    def _nodes(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("novacron_node_up", "1 when the node is up.", labels=["node"])
        capacity = GaugeMetricFamily(
            "novacron_node_capacity", "Capacity offered by a node.", labels=["node", "resource"]
        )
        allocated = GaugeMetricFamily(
            "novacron_node_allocated", "Capacity reserved by VMs on a node.", labels=["node", "resource"]
        )
        for node in Node.objects.order_by("name"):
            up.add_metric([node.name], 1 if node.status == NodeStatus.UP else 0)
            for resource, total, used in (
                ("vcpus", node.vcpus, node.allocated_vcpus),
                ("memory_mb", node.memory_mb, node.allocated_memory_mb),
                ("disk_gb", node.disk_gb, node.allocated_disk_gb),
            ):
                capacity.add_metric([node.name, resource], total)
                allocated.add_metric([node.name, resource], used)
        sampled = GaugeMetricFamily(
            "novacron_node_sample",
            "Newest sample a node reported (node.cpu_percent...).",
            labels=["node", "name"],
        )
        for (node_name, name), value in latest_by_node(
            NODE_METRICS, since=timezone.now() - NODE_METRIC_MAX_AGE
        ).items():
            sampled.add_metric([node_name, name], value)
        yield from (up, capacity, allocated, sampled)

    def _migrations(self) -> Iterator[Metric]:
        by_status = GaugeMetricFamily("novacron_migrations", "Migrations by status.", labels=["status"])
        for status, count in Migration.objects.values_list("status").annotate(n=Count("id")).order_by():
            by_status.add_metric([status], count)
        yield by_status
        wire_total = migration_wire_bytes() or 0.0
        yield CounterMetricFamily(
            "novacron_migration_wire_bytes", "DWCP bytes sent by finished migrations.", value=wire_total
        )
        rate = GaugeMetricFamily(
            "novacron_migration_rate_bytes_per_second",
            "Live DWCP rate of a running migration.",
            labels=["migration"],
        )
        client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=2, socket_connect_timeout=2)
        active = Migration.objects.filter(status__in=ACTIVE_STATUSES).values_list("pk", flat=True)
        for migration_id, bytes_per_second in migration_live_rates(client, active).items():
            rate.add_metric([migration_id], bytes_per_second)
        yield rate


def _authorized(request: HttpRequest) -> bool:
    token = monitoring_setting("METRICS_TOKEN")
    header = request.headers.get("Authorization", "")
    if (
        token
        and header.startswith("Bearer ")
        and hmac.compare_digest(header[len("Bearer ") :].encode(), token.encode())
    ):
        return True
    user = getattr(request, "user", None)
    return bool(user is not None and user.is_authenticated and user.is_staff)


def metrics_view(request: HttpRequest) -> HttpResponse:
    if not _authorized(request):
        response = HttpResponse("Authentication required: a bearer token or a staff session.\n", status=401)
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory and os.path.isdir(directory):
        registry = CollectorRegistry(auto_describe=False)
        registry.register(MultiProcessFiles(directory))
        body = generate_latest(registry)
    else:
        body = generate_latest(REGISTRY)
    extras = CollectorRegistry(auto_describe=False)
    extras.register(ControlPlaneCollector())
    body += generate_latest(extras)
    return HttpResponse(body, content_type=CONTENT_TYPE_LATEST)
