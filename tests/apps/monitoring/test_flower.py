"""Flower, as ``make run`` starts it: basic auth, node workers listed under their node's name, and the
tasks they run."""

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from prometheus_client.multiprocess import MultiProcessCollector

from novacron.celery import app as celery_app

ROOT = Path(__file__).resolve().parents[3]
PASSWORD = "flower-test-password"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _get(url: str, *, auth: bool) -> tuple[int, bytes]:
    headers = {}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(f"admin:{PASSWORD}".encode()).decode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=15) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@pytest.mark.integration
def test_flower_lists_a_node_worker_by_its_node_name_and_wants_credentials(tmp_path):
    """Also: the worker's Celery task counts land in the Prometheus multiprocess directory."""
    node = f"nodex{uuid.uuid4().hex[:8]}"
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env |= {"DJANGO_SETTINGS_MODULE": "novacron.settings.test", "ALERT_WEBHOOK_URL": ""}
    celery = [sys.executable, "-m", "celery", "-A", "novacron"]
    worker = subprocess.Popen(
        [
            *celery,
            "worker",
            "-n",
            f"{node}@%h",
            "-Q",
            f"node.{node}",
            "--pool",
            "threads",
            "--concurrency",
            "1",
            "--loglevel",
            "WARNING",
            "--without-mingle",
            "--without-gossip",
        ],
        cwd=ROOT,
        env=env | {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    flower = subprocess.Popen(
        [*celery, "flower", "--address=127.0.0.1", f"--port={port}", f"--basic-auth=admin:{PASSWORD}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        workers: dict = {}
        while time.monotonic() < deadline:
            assert worker.poll() is None and flower.poll() is None, "a process exited early"
            try:
                status, body = _get(f"{base}/api/workers?refresh=1", auth=True)
            except OSError:  # Flower not listening yet
                time.sleep(0.5)
                continue
            if status == 200:
                workers = json.loads(body)
                ours = [info for name, info in workers.items() if name.startswith(f"{node}@")]
                # Flower fills a worker's entry as the inspect replies arrive: wait for its queues.
                if ours and ours[0].get("active_queues"):
                    break
            time.sleep(0.5)
        (name,) = [name for name in workers if name.startswith(f"{node}@")]
        queues = [queue["name"] for queue in workers[name].get("active_queues", [])]
        assert f"node.{node}" in queues
        assert _get(f"{base}/api/workers", auth=False)[0] == 401
        assert _get(f"{base}/", auth=False)[0] == 401

        task = "apps.monitoring.tasks.alert_webhook_send"  # returns at once without a webhook URL
        sent = celery_app.send_task(task, kwargs={"alert_id": 0, "event": "firing"}, queue=f"node.{node}")
        deadline = time.monotonic() + 30
        done = None
        while done is None and time.monotonic() < deadline:
            files = [str(path) for path in tmp_path.glob("*.db")]
            for family in MultiProcessCollector.merge(files):
                for sample in family.samples:
                    if sample.name == "novacron_celery_tasks_total" and sample.labels == {
                        "task": task,
                        "state": "SUCCESS",
                    }:
                        done = sample.value
            time.sleep(0.2)
        assert done == 1
        # Flower follows the task through the worker's events (senders send no task-sent event).
        deadline = time.monotonic() + 30
        info: dict = {}
        while info.get("state") != "SUCCESS" and time.monotonic() < deadline:
            status, body = _get(f"{base}/api/task/info/{sent.id}", auth=True)
            info = json.loads(body) if status == 200 else {}
            time.sleep(0.3)
        assert (info.get("state"), info.get("name")) == ("SUCCESS", task)
    finally:
        for process in (flower, worker):
            process.terminate()
        for process in (flower, worker):
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
