"""Alert rules: the default rules fire and resolve on synthetic samples; lifecycle, API, webhook."""

import hashlib
import hmac
import json
import threading
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from apps.monitoring import services
from apps.monitoring.choices import AlertStatus
from apps.monitoring.models import Alert, AlertRule, Metric
from apps.monitoring.selectors import _windows_postgres, _windows_python
from apps.monitoring.tasks import alert_webhook_send

pytestmark = pytest.mark.django_db

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
STEP = timedelta(seconds=10)
GIB = 1024**3


def _samples(name, value, *, start, until, node=None):
    count = int((until - start) / STEP)
    Metric.objects.bulk_create(
        Metric(timestamp=start + index * STEP, name=name, value=value, node=node) for index in range(count)
    )


def _open(rule):
    return list(Alert.objects.filter(rule=rule).exclude(status=AlertStatus.RESOLVED))


DEFAULTS = [
    # (rule name, metric, breaching value, healthy value, per node)
    ("API latency p95 above 100 ms", "api.latency_p95_ms", 180.0, 40.0, False),
    ("Database query average above 50 ms", "db.query_avg_ms", 75.0, 3.0, False),
    ("Node CPU above 70%", "node.cpu_percent", 92.0, 20.0, True),
    ("Node memory used above 8 GiB", "node.memory_used_bytes", 9.5 * GIB, 2.0 * GIB, True),
    ("Migration waits for an operator", "migrations.needs_operator", 1.0, 0.0, False),
]


@pytest.mark.parametrize(("rule_name", "metric", "high", "low", "per_node"), DEFAULTS)
def test_each_default_rule_fires_after_its_duration_and_resolves(
    rule_name, metric, high, low, per_node, make_node
):
    rule = AlertRule.objects.get(name=rule_name)  # loaded by the data migration
    assert rule.enabled and rule.metric == metric
    hot = make_node("hot") if per_node else None
    cool = make_node("cool") if per_node else None
    duration = timedelta(seconds=rule.for_seconds)
    _samples(metric, high, start=T0, until=T0 + duration, node=hot)
    if per_node:
        _samples(metric, low, start=T0, until=T0 + duration, node=cool)

    # Breaching, but not yet for the whole duration: nothing fires.
    services.alerts_evaluate(now=T0 + duration - timedelta(seconds=61))
    assert _open(rule) == []

    fired_at = T0 + duration - timedelta(seconds=1)
    assert services.alerts_evaluate(now=fired_at)["fired"] >= 1
    (alert,) = _open(rule)
    assert alert.status == AlertStatus.FIRING
    assert alert.subject == ("hot" if per_node else "")
    assert alert.value == pytest.approx(high)
    assert alert.started_at == fired_at
    assert rule.metric in alert.message

    # Evaluating again while it still breaches keeps the one open alert.
    services.alerts_evaluate(now=fired_at + timedelta(seconds=30))
    assert len(_open(rule)) == 1

    # The newest window turns healthy: resolved.
    _samples(metric, low, start=T0 + duration, until=T0 + duration + timedelta(minutes=2), node=hot)
    resolved_at = T0 + duration + timedelta(minutes=1, seconds=59)
    assert services.alerts_evaluate(now=resolved_at)["resolved"] == 1
    alert.refresh_from_db()
    assert alert.status == AlertStatus.RESOLVED and alert.resolved_at == resolved_at
    assert _open(rule) == []


def test_a_gap_in_the_samples_keeps_a_rule_from_firing():
    rule = AlertRule.objects.get(metric="db.query_avg_ms")
    _samples("db.query_avg_ms", 90.0, start=T0, until=T0 + timedelta(minutes=2))
    _samples("db.query_avg_ms", 90.0, start=T0 + timedelta(minutes=3), until=T0 + timedelta(minutes=5))
    services.alerts_evaluate(now=T0 + timedelta(minutes=5) - timedelta(seconds=1))
    assert _open(rule) == []


def test_python_window_aggregates_match_postgresql(make_node):
    node = make_node("n1")
    values = [float((index * 37) % 101) for index in range(120)]
    Metric.objects.bulk_create(
        Metric(timestamp=T0 + index * STEP, name="node.cpu_percent", value=value, node=node)
        for index, value in enumerate(values)
    )
    rows = Metric.objects.filter(name="node.cpu_percent")
    now = T0 + 120 * STEP
    in_sql = _windows_postgres(rows, subject_field="node_id", now=now, width=60)
    in_python = _windows_python(rows, subject_field="node_id", now=now, width=60)
    assert in_sql.keys() == in_python.keys()
    for subject, windows in in_sql.items():
        assert windows.keys() == in_python[subject].keys()
        for index, aggregate in windows.items():
            other = in_python[subject][index]
            assert aggregate.count == other.count
            assert aggregate.avg == pytest.approx(other.avg)
            assert aggregate.max == other.max
            assert aggregate.p95 == pytest.approx(other.p95)


def test_alerts_are_listed_filtered_acknowledged_once_and_resolved_alerts_are_final(staff_api, staff, api):
    rule = AlertRule.objects.get(metric="api.latency_p95_ms")
    _samples("api.latency_p95_ms", 500.0, start=T0, until=T0 + timedelta(minutes=5))
    services.alerts_evaluate(now=T0 + timedelta(minutes=5) - timedelta(seconds=1))
    (alert,) = _open(rule)

    listed = staff_api.get("/api/v1/alerts/", {"status": "firing", "severity": "warning"}).json()["results"]
    assert [item["id"] for item in listed] == [alert.pk]
    assert listed[0]["rule"] == rule.name and listed[0]["metric"] == "api.latency_p95_ms"
    assert staff_api.get("/api/v1/alerts/", {"severity": "critical"}).json()["results"] == []
    assert staff_api.get("/api/v1/alerts/", {"status": "burning"}).status_code == 400
    assert api.get("/api/v1/alerts/").status_code == 403

    acked = staff_api.post(f"/api/v1/alerts/{alert.pk}/acknowledge/")
    assert acked.status_code == 200, acked.json()
    assert acked.json()["status"] == "acknowledged" and acked.json()["acknowledged_by"] == staff.username
    again = staff_api.post(f"/api/v1/alerts/{alert.pk}/acknowledge/")
    assert again.status_code == 200 and again.json()["acknowledged_at"] == acked.json()["acknowledged_at"]

    # An acknowledged alert still resolves, and stays the one open alert until then.
    services.alerts_evaluate(now=T0 + timedelta(minutes=5, seconds=20))
    assert _open(rule)[0].status == AlertStatus.ACKNOWLEDGED
    services.alerts_evaluate(now=T0 + timedelta(minutes=7))  # newest window has no samples
    alert.refresh_from_db()
    assert alert.status == AlertStatus.RESOLVED
    late = staff_api.post(f"/api/v1/alerts/{alert.pk}/acknowledge/")
    assert late.status_code == 409 and late.json()["error"]["code"] == "invalid_state"


def test_a_disabled_rule_resolves_its_alerts():
    rule = AlertRule.objects.get(metric="db.query_avg_ms")
    _samples("db.query_avg_ms", 90.0, start=T0, until=T0 + timedelta(minutes=5))
    now = T0 + timedelta(minutes=5) - timedelta(seconds=1)
    services.alerts_evaluate(now=now)
    assert len(_open(rule)) == 1
    AlertRule.objects.filter(pk=rule.pk).update(enabled=False)
    services.alerts_evaluate(now=now)
    assert _open(rule) == []


def test_staff_manage_alert_rules_and_bad_rules_answer_400(staff_api, api):
    listed = staff_api.get("/api/v1/alert-rules/").json()["results"]
    assert len(listed) == len(DEFAULTS)
    created = staff_api.post(
        "/api/v1/alert-rules/",
        {
            "name": "Control queue backlog",
            "metric": "queue.control.depth",
            "aggregation": "max",
            "comparison": "gte",
            "threshold": 1000,
            "window_seconds": 60,
            "for_seconds": 120,
            "severity": "critical",
            "scope": "global",
        },
        format="json",
    )
    assert created.status_code == 201, created.json()
    rule_id = created.json()["id"]
    patched = staff_api.patch(f"/api/v1/alert-rules/{rule_id}/", {"threshold": 500}, format="json")
    assert patched.json()["threshold"] == 500
    bad = staff_api.post(
        "/api/v1/alert-rules/",
        {"name": "x", "metric": "y", "threshold": 1, "comparison": "~", "window_seconds": 0},
        format="json",
    )
    assert bad.status_code == 400
    assert {"comparison", "window_seconds"} <= set(bad.json()["error"]["fields"])
    typo = staff_api.post("/api/v1/alert-rules/", {"name": "x", "metric": "y", "treshold": 1}, format="json")
    assert typo.status_code == 400 and "treshold" in typo.json()["error"]["fields"]
    assert api.get("/api/v1/alert-rules/").status_code == 403
    assert staff_api.delete(f"/api/v1/alert-rules/{rule_id}/").status_code == 204


class _Receiver(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.headers, body))  # header names are case-insensitive there
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_firing_and_resolving_post_a_signed_webhook(monitoring, django_capture_on_commit_callbacks):
    server = HTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Receiver.received = []
    monitoring["ALERT_WEBHOOK_URL"] = f"http://127.0.0.1:{server.server_port}/hook"
    monitoring["ALERT_WEBHOOK_SECRET"] = secret = "hook-secret"
    try:
        rule = AlertRule.objects.get(metric="db.query_avg_ms")
        _samples("db.query_avg_ms", 90.0, start=T0, until=T0 + timedelta(minutes=5))
        with django_capture_on_commit_callbacks() as callbacks:
            services.alerts_evaluate(now=T0 + timedelta(minutes=5) - timedelta(seconds=1))
        assert len(callbacks) == 1  # the webhook task is sent once the alert is committed
        (alert,) = _open(rule)
        assert alert_webhook_send(alert_id=alert.pk, event="firing") == 204
        headers, body = _Receiver.received[-1]
        expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers["X-NovaCron-Signature"], expected)
        payload = json.loads(body)
        assert payload["event"] == "firing"
        assert payload["alert"]["rule"] == rule.name and payload["alert"]["value"] == 90.0
    finally:
        server.shutdown()


def test_staff_acknowledge_alerts_and_edit_rules_in_admin(client, staff):
    rule = AlertRule.objects.get(metric="db.query_avg_ms")
    _samples("db.query_avg_ms", 90.0, start=T0, until=T0 + timedelta(minutes=5))
    services.alerts_evaluate(now=T0 + timedelta(minutes=5) - timedelta(seconds=1))
    (alert,) = _open(rule)
    client.force_login(staff)
    answer = client.post(
        "/admin/monitoring/alert/", {"action": "acknowledge", "_selected_action": [alert.pk]}, follow=True
    )
    assert answer.status_code == 200
    alert.refresh_from_db()
    assert alert.status == AlertStatus.ACKNOWLEDGED and alert.acknowledged_by == staff
    assert client.get(f"/admin/monitoring/alertrule/{rule.pk}/change/").status_code == 200
