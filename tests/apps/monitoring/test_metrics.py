"""Control-plane samples, downsampled series computed in PostgreSQL, and retention."""

from datetime import UTC, datetime, timedelta

import pytest

from apps.monitoring import services
from apps.monitoring.keys import LAST_SAMPLE, key
from apps.monitoring.models import APILog, Metric
from apps.monitoring.selectors import percentile
from apps.monitoring.services.metrics import histogram_quantile
from apps.vms.models import VM

pytestmark = pytest.mark.django_db

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def _rows(name, values, *, start=T0, every=timedelta(seconds=10), node=None, vm=None):
    Metric.objects.bulk_create(
        Metric(timestamp=start + index * every, name=name, value=value, node=node, vm=vm)
        for index, value in enumerate(values)
    )


def test_control_sample_turns_request_counters_into_metric_rows(api, redis_client, node):
    for _ in range(10):
        api.get("/api/v1/users/me/")
    api.get(f"/api/v1/nodes/{node.pk}/")
    redis_client.delete("node.node1")
    redis_client.rpush("node.node1", b"m1", b"m2")
    redis_client.rpush("node.node1\x06\x163", b"m3")
    try:
        now = 1_800_000_000.0
        services.control_metrics_sample(client=redis_client, now=now - 10)  # sets the interval origin
        for _ in range(4):
            api.get("/api/v1/users/me/")
        written = services.control_metrics_sample(client=redis_client, now=now)
    finally:
        redis_client.delete("node.node1", "node.node1\x06\x163")
    assert written >= 8
    latest = {
        (metric.name, metric.node_id): metric.value
        for metric in Metric.objects.filter(timestamp=datetime.fromtimestamp(now, tz=UTC))
    }
    assert latest[("api.requests_per_second", None)] == pytest.approx(4 / 10)
    assert latest[("api.error_ratio", None)] == 0
    assert 0 < latest[("api.latency_p95_ms", None)] < 10_000
    assert latest[("api.latency_avg_ms", None)] > 0
    assert latest[("db.query_avg_ms", None)] > 0
    assert 0 <= latest[("cache.hit_ratio", None)] <= 1  # the throttle reads the cache
    assert latest[("queue.node.depth", node.pk)] == 3
    assert ("queue.control.depth", None) in latest
    assert latest[("migrations.active", None)] == 0


def test_histogram_quantile_interpolates_inside_the_bucket():
    # 100 requests: 90 in (0, 5] ms, 10 in (50, 75] ms -> p95 lies half-way through the second bucket
    stats = {"le_5": 90, "le_75": 10}
    assert histogram_quantile(0.95, stats) == pytest.approx(50 + 25 * 0.5)
    assert histogram_quantile(0.95, {}) == 0


def test_series_are_downsampled_in_the_database(staff_api, node, make_node):
    other = make_node("node9")
    values = [float(value) for value in range(1, 31)]  # 30 samples, 10 s apart: 5 minutes
    _rows("node.cpu_percent", values, node=node)
    _rows("node.cpu_percent", [99.0] * 30, node=other)
    answer = staff_api.get(
        "/api/v1/metrics/",
        {
            "name": "node.cpu_percent",
            "node": "node1",
            "since": T0.isoformat(),
            "until": (T0 + timedelta(minutes=5)).isoformat(),
            "step": "1m",
        },
    )
    assert answer.status_code == 200, answer.json()
    body = answer.json()
    assert body["step"] == 60 and body["node"] == "node1"
    points = body["points"]
    assert len(points) == 5
    for index, point in enumerate(points):
        bucket = values[index * 6 : index * 6 + 6]
        assert point["count"] == 6
        assert point["avg"] == pytest.approx(sum(bucket) / 6)
        assert point["max"] == max(bucket)
        assert point["p95"] == pytest.approx(percentile(bucket, 0.95))
        assert datetime.fromisoformat(point["t"].replace("Z", "+00:00")) == T0 + index * timedelta(minutes=1)
    everyone = staff_api.get(
        "/api/v1/metrics/",
        {"name": "node.cpu_percent", "since": T0.isoformat(), "until": "2026-11-01T12:05:00Z", "step": "300"},
    ).json()
    assert everyone["points"][0]["count"] == 60 and everyone["points"][0]["max"] == 99


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({}, "name"),
        ({"name": "x", "step": "0"}, "step"),
        ({"name": "x", "step": "5 minutes"}, "step"),
        ({"name": "x", "since": "yesterday"}, "since"),
        ({"name": "x", "since": "2026-11-02T00:00:00Z", "until": "2026-11-01T00:00:00Z"}, "since"),
        ({"name": "x", "since": "2026-01-01T00:00:00Z", "until": "2026-11-01T00:00:00Z"}, "since"),
        (
            {"name": "x", "step": "1s", "since": "2026-11-01T00:00:00Z", "until": "2026-11-02T00:00:00Z"},
            "step",
        ),
        ({"name": "x", "node": "no-such-node"}, "node"),
        ({"name": "x", "vm": "not-a-uuid"}, "vm"),
        ({"name": "x", "colour": "blue"}, "colour"),
    ],
)
def test_series_parameters_are_validated(staff_api, query, field):
    answer = staff_api.get("/api/v1/metrics/", query)
    assert answer.status_code == 400
    assert field in answer.json()["error"]["fields"]


def test_series_are_staff_only_unless_asked_for_an_own_vm(api, other_api, user, node, image):
    answer = api.get("/api/v1/metrics/", {"name": "node.cpu_percent"})
    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "not_found"
    vm = VM.objects.create(
        name="mine", owner=user, node=node, image=image, state="running", vcpus=1, memory_mb=512, disk_gb=1
    )
    _rows("vm.rss_bytes", [100.0, 300.0], start=T0, node=node, vm=vm)
    query = {
        "name": "vm.rss_bytes",
        "vm": str(vm.pk),
        "since": T0.isoformat(),
        "until": "2026-11-01T12:01:00Z",
        "step": "1m",
    }
    mine = api.get("/api/v1/metrics/", query | {"format": "json"})
    assert mine.status_code == 200, mine.json()
    (point,) = mine.json()["points"]
    assert (point["count"], point["avg"], point["max"]) == (2, 200.0, 300.0)
    assert other_api.get("/api/v1/metrics/", query).status_code == 404


def test_retention_deletes_only_what_is_older_in_batches(node):
    now = T0 + timedelta(days=30)
    old = now - timedelta(days=14, seconds=1)
    young = now - timedelta(days=13, hours=23)
    _rows("node.cpu_percent", [1.0] * 25, start=old - timedelta(minutes=10), node=node)
    _rows("node.cpu_percent", [2.0] * 7, start=young, node=node)
    APILog.objects.bulk_create(
        APILog(timestamp=when, method="GET", endpoint="/api/v1/vms/", status=200, duration_ms=1)
        for when in (old, young)
    )
    assert services.metrics_prune(now=now, days=14, batch=10, budget_seconds=0) == {
        "metrics": 0,
        "api_logs": 0,
    }
    deleted = services.metrics_prune(now=now, days=14, batch=10)
    assert deleted == {"metrics": 25, "api_logs": 1}
    assert list(Metric.objects.values_list("value", flat=True).distinct()) == [2.0]
    assert Metric.objects.count() == 7
    assert list(APILog.objects.values_list("timestamp", flat=True)) == [young]


def test_migration_throughput_is_sampled_and_exposed_when_present(
    redis_client, client, staff, make_node, image, user, monitoring
):
    from django.utils import timezone

    from apps.migrations.models import Migration
    from workers import contract

    source, dest = make_node("src"), make_node("dst")

    def vm(name):
        return VM.objects.create(
            name=name,
            owner=user,
            node=source,
            image=image,
            state="running",
            vcpus=1,
            memory_mb=256,
            disk_gb=1,
        )

    running = Migration.objects.create(vm=vm("a"), source_node=source, dest_node=dest, status="transferring")
    Migration.objects.create(
        vm=vm("b"),
        source_node=source,
        dest_node=dest,
        status="completed",
        finished_at=timezone.now(),
        stats={"wire_bytes": 5_000_000, "downtime_ms": 40},
    )
    progress_key = contract.MIGRATION_PROGRESS_KEY.format(id=running.pk)
    redis_client.hset(progress_key, mapping={"phase": "memory", "rate_bps": "12500000", "percent": "40"})
    try:
        now = timezone.now().timestamp()
        redis_client.set(key(LAST_SAMPLE), repr(now - 10))
        services.control_metrics_sample(client=redis_client, now=now)
        client.force_login(staff)
        text = client.get("/metrics").content.decode()
    finally:
        redis_client.delete(progress_key)
    sampled = dict(Metric.objects.filter(name__startswith="migrations.").values_list("name", "value"))
    assert sampled["migrations.active"] == 1
    assert sampled["migrations.rate_bytes_per_second"] == 12_500_000
    assert sampled["migrations.bytes_per_second"] == pytest.approx(5_000_000 / 10)
    assert f'novacron_migration_rate_bytes_per_second{{migration="{running.pk}"}} 1.25e+07' in text
    assert "novacron_migration_wire_bytes_total 5e+06" in text
    assert 'novacron_migrations{status="transferring"} 1.0' in text
