"""The pipeline as ``make run`` runs it: granian web, control worker and beat as processes.

Requests served by the web process reach ``api_logs`` through Redis and the control worker (beat
ticks), the control-plane sampler writes metric rows, and ``/metrics`` on the web process counts the
Celery tasks the worker ran (shared multiprocess directory). Redis database 13 keeps this run's
broker traffic away from other test runs on database 15.
"""

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import redis
from django.db import connection
from prometheus_client.parser import text_string_to_metric_families

from apps.accounts.services import token_create
from apps.monitoring.models import APILog, Metric

ROOT = Path(__file__).resolve().parents[3]
BIN = Path(sys.executable).parent
REDIS_URL = "redis://127.0.0.1:6379/13"
TOKEN = "pipeline-metrics-token"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_requests_become_log_rows_samples_and_prometheus_counts_across_processes(tmp_path, make_user):
    user = make_user("pipeline")
    token = token_create(user=user).secret
    database = connection.settings_dict
    prefix = f"novacron-pipeline-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"} | {
        "DJANGO_SETTINGS_MODULE": "novacron.settings.test",
        "DATABASE_URL": f"postgres://{database['USER']}@{database['HOST']}:{database['PORT']}/{database['NAME']}",
        "REDIS_URL": REDIS_URL,
        "CACHE_KEY_PREFIX": prefix,
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prometheus"),
        "METRICS_TOKEN": TOKEN,
        "API_LOG_FLUSH_INTERVAL": "1",
    }
    port = _free_port()
    commands = {
        "web": [
            str(BIN / "granian"),
            "--interface",
            "wsgi",
            "novacron.wsgi:application",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--blocking-threads",
            "2",
            "--no-ws",
        ],
        "control": [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "novacron",
            "worker",
            "-Q",
            "control",
            "-n",
            f"control-{prefix}@%h",
            "--pool",
            "threads",
            "--concurrency",
            "2",
            "--loglevel",
            "WARNING",
            "--without-mingle",
            "--without-gossip",
        ],
        "beat": [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "novacron",
            "beat",
            "--loglevel",
            "WARNING",
            "--schedule",
            str(tmp_path / "beat-schedule"),
        ],
    }
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in commands}  # noqa: SIM115
    processes = {
        name: subprocess.Popen(command, cwd=ROOT, env=env, stdout=logs[name], stderr=subprocess.STDOUT)
        for name, command in commands.items()
    }
    broker = redis.Redis.from_url(REDIS_URL)
    base = f"http://127.0.0.1:{port}"
    try:

        def web_up() -> bool:
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", port)) == 0

        _until(web_up, 30, "the web server")
        requests = 5
        for _ in range(requests):
            request = urllib.request.Request(
                f"{base}/api/v1/users/me/", headers={"Authorization": f"Token {token}"}
            )
            with urllib.request.urlopen(request, timeout=10) as answer:
                assert answer.status == 200

        _until(lambda: APILog.objects.filter(user=user).count() == requests, 30, "the API log flush")
        logged = APILog.objects.filter(user=user)
        assert {log.endpoint for log in logged} == {"/api/v1/users/me/"}
        _until(
            lambda: Metric.objects.filter(name="api.requests_per_second", value__gt=0).exists(),
            30,
            "a control-plane sample with the requests",
        )
        assert Metric.objects.filter(name="queue.control.depth").exists()

        scrape = urllib.request.Request(f"{base}/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(scrape, timeout=10) as answer:
            samples = [
                s for family in text_string_to_metric_families(answer.read().decode()) for s in family.samples
            ]

        def value(name: str, **labels: str) -> float:
            return sum(
                s.value
                for s in samples
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
            )

        assert value("novacron_http_requests_total", endpoint="/api/v1/users/me/", status="200") == requests
        flushed = value(
            "novacron_celery_tasks_total", task="apps.monitoring.tasks.api_logs_flush", state="SUCCESS"
        )
        sampled = value(
            "novacron_celery_tasks_total",
            task="apps.monitoring.tasks.control_metrics_sample",
            state="SUCCESS",
        )
        assert flushed >= 1 and sampled >= 1
        assert (
            value("novacron_celery_task_duration_seconds_count", task="apps.monitoring.tasks.api_logs_flush")
            >= 1
        )
    finally:
        for process in processes.values():
            process.terminate()
        for process in processes.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        for log in logs.values():
            log.close()
        stale = list(broker.scan_iter(f"{prefix}:*"))
        broker.delete("control", *stale)
