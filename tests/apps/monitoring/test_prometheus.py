"""``GET /metrics``: protected, parseable, and merged across processes (multiprocess mode)."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from django.db import connection
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parents[3]
TOKEN = "scrape-token-for-tests"


def _families(text: str) -> dict:
    return {family.name: family for family in text_string_to_metric_families(text)}


def _sample(families: dict, family: str, name: str, **labels: str) -> float | None:
    for sample in families[family].samples:
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
            return sample.value
    return None


def test_metrics_need_the_token_or_a_staff_session(client, monitoring, staff, user):
    monitoring["METRICS_TOKEN"] = TOKEN
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    client.force_login(user)
    assert client.get("/metrics").status_code == 401
    client.force_login(staff)
    assert client.get("/metrics").status_code == 200
    client.logout()
    assert client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}").status_code == 200


def test_metrics_parse_and_count_requests_by_route_pattern(client, api, monitoring, node):
    monitoring["METRICS_TOKEN"] = TOKEN
    before = _families(client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}").content.decode())
    labels = {"method": "GET", "endpoint": "/api/v1/nodes/{pk}/", "status": "200"}
    start = _sample(before, "novacron_http_requests", "novacron_http_requests_total", **labels) or 0
    for _ in range(3):
        assert api.get(f"/api/v1/nodes/{node.pk}/").status_code == 200
    answer = client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    assert answer["Content-Type"].startswith("text/plain")
    families = _families(answer.content.decode())
    assert _sample(families, "novacron_http_requests", "novacron_http_requests_total", **labels) == start + 3
    histogram = families["novacron_http_request_duration_seconds"]
    assert any(
        s.name.endswith("_bucket") and s.labels.get("endpoint") == "/api/v1/nodes/{pk}/"
        for s in histogram.samples
    )
    assert (
        _sample(families, "novacron_db_query_duration_seconds", "novacron_db_query_duration_seconds_count")
        or 0
    ) > 0
    assert "novacron_cache_requests" in families
    assert (
        _sample(families, "novacron_node_capacity", "novacron_node_capacity", node="node1", resource="vcpus")
        == 16
    )
    assert _sample(families, "novacron_queue_depth", "novacron_queue_depth", queue="control") is not None
    assert "novacron_migrations" in families and "novacron_api_log_dropped" in families


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited: {process.stdout.read() if process.stdout else ''}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on {port}")


def test_a_request_served_by_another_process_is_counted(tmp_path):
    """Two granian servers share the multiprocess directory: B's /metrics counts what A served."""
    database = connection.settings_dict
    env = os.environ | {
        "DJANGO_SETTINGS_MODULE": "novacron.settings.test",
        "DATABASE_URL": f"postgres://{database['USER']}@{database['HOST']}:{database['PORT']}/{database['NAME']}",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
        "METRICS_TOKEN": TOKEN,
    }
    ports = [_free_port(), _free_port()]
    servers = [
        subprocess.Popen(
            [
                str(Path(sys.executable).parent / "granian"),
                "--interface",
                "wsgi",
                "novacron.wsgi:application",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
                "--no-ws",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for port in ports
    ]
    try:
        for port, server in zip(ports, servers, strict=True):
            _wait_for_port(port, server)
        served = 4
        for _ in range(served):
            with urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/healthz", timeout=10) as answer:
                assert answer.status == 200
        request = urllib.request.Request(
            f"http://127.0.0.1:{ports[1]}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            families = _families(answer.read().decode())
        labels = {"method": "GET", "endpoint": "/healthz", "status": "200"}
        assert _sample(families, "novacron_http_requests", "novacron_http_requests_total", **labels) == served
        count = _sample(
            families,
            "novacron_http_request_duration_seconds",
            "novacron_http_request_duration_seconds_count",
            method="GET",
            endpoint="/healthz",
        )
        assert count == served
        assert any(path.name.endswith(".db") for path in tmp_path.iterdir())
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            server.wait(timeout=20)
