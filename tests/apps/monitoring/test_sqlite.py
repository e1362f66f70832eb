"""The embedded SQLite setup (``make run`` without DATABASE_URL): monitoring works there too.

PostgreSQL-only SQL (``date_bin``, ``percentile_cont``, ``DISTINCT ON``) has Python counterparts;
this runs them in a separate process against a fresh SQLite file.
"""

import pytest

SCRIPT = """
from datetime import timedelta

import django

django.setup()

from django.core.management import call_command

call_command("migrate", "--no-input", "-v", "0")

import redis
from django.conf import settings
from django.contrib.auth import get_user_model
from django.test import Client
from django.utils import timezone

from apps.monitoring import services
from apps.monitoring.dashboard import dashboard_context
from apps.monitoring.models import Alert, Metric
from apps.monitoring.selectors import metric_series
from apps.vms.models import Node

now = timezone.now()
node = Node.objects.create(name="n1", address="h", dwcp_address="h:1", vcpus=4, memory_mb=4096, disk_gb=10)
Metric.objects.bulk_create(
    Metric(timestamp=now - timedelta(seconds=10 * i), name="node.cpu_percent", value=95.0, node=node)
    for i in range(70)
)
points = metric_series(name="node.cpu_percent", since=now - timedelta(minutes=12), until=now + timedelta(seconds=1), step_seconds=60)
assert sum(p.aggregate.count for p in points) == 70 and points[-1].aggregate.p95 == 95.0, points
assert services.alerts_evaluate(now=now)["fired"] == 1
assert Alert.objects.get().subject == "n1"
client = redis.Redis.from_url(settings.REDIS_URL)
assert services.control_metrics_sample(client=client) > 0
assert services.metrics_prune(days=0) ["metrics"] > 0
staff = get_user_model().objects.create_user("op", password="pw", is_staff=True)
browser = Client()
browser.force_login(staff)
assert browser.get("/dashboard/").status_code == 200
answer = browser.get("/api/v1/metrics/", {"name": "node.cpu_percent", "step": "1m"})
assert answer.status_code == 200, answer.content
assert browser.get("/metrics").status_code == 200
print("sqlite ok")
"""


@pytest.mark.integration
def test_series_alerts_sampling_dashboard_and_metrics_work_on_sqlite(run_on_sqlite):
    # One process: migrate the fresh file, then exercise monitoring on it.
    assert "sqlite ok" in run_on_sqlite(SCRIPT)
