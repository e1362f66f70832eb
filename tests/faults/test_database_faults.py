"""PostgreSQL backends terminated (``pg_terminate_backend``) while the API is under load.

A real web server (granian, the production WSGI server, one process with blocking threads) serves
the test database; client threads read and write through the API while another thread terminates
every backend the server holds, every 2 s. The API must not answer 5xx: the psycopg pool
checks a connection before handing it out, and a request that loses its connection mid-way is
retried (``apps.core.retry``).
"""

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import psycopg
import pytest
from django.conf import settings

from apps.accounts.services import token_create
from apps.vms.models import VM
from tests.faults.conftest import FaultRecord
from tests.workers.node.conftest import ROOT, _database_url, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.django_db(transaction=True)]

APP_NAME = "novacron-faults-web"
LOAD_SECONDS = 12


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _request(port: int, token: str, method: str, path: str, body: dict | None = None) -> tuple[int, float]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=data,
        method=method,
        headers={"Authorization": f"Token {token}", "Content-Type": "application/json"},
    )
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()
            status = response.status
    except urllib.error.HTTPError as exc:
        exc.read()
        status = exc.code
    return status, time.monotonic() - started


def test_postgres_backends_terminated_under_api_load(
    user, make_node, make_image, tmp_path: Path, fault: FaultRecord
):
    fault.describe(
        scenario="PostgreSQL backends terminated during API load",
        action=f"granian serving the API; 4 client threads (list, detail, users/me, rename) for "
        f"{LOAD_SECONDS} s while pg_terminate_backend() hits every backend of the server every 2 s",
        invariant="no 5xx answer; the renames that answered 200 are all in the database; every round "
        "of terminations is followed by a 200",
    )
    node = make_node("pg-node")
    image = make_image("pg-image")
    vms = [
        VM.objects.create(owner=user, name=f"pg{i}", image=image, node=node, vcpus=1, memory_mb=64, disk_gb=1)
        for i in range(4)
    ]
    token = token_create(user=user).secret
    port = _free_port()
    url = _database_url()
    env = os.environ | {
        "DJANGO_SETTINGS_MODULE": "novacron.settings.main",
        "DATABASE_URL": f"{url}?application_name={APP_NAME}",
        "REDIS_URL": settings.REDIS_URL,
        "SECRET_KEY": "integration",
        "THROTTLE_USER": "1000000/min",
        "CACHE_KEY_PREFIX": f"faults-pg-{port}",
    }
    log = (tmp_path / "web.log").open("wb")
    server = subprocess.Popen(
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
            "--blocking-threads",
            "4",
            "--no-ws",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for(lambda: _up(port), 30, "the web server")
        statuses: Counter[int] = Counter()
        slowest = 0.0
        renamed: dict[str, str] = {}
        stop = threading.Event()
        awaiting = threading.Event()  # backends were terminated and no answer has come back since
        lock = threading.Lock()

        def client(index: int) -> None:
            nonlocal slowest
            vm = vms[index]
            step = 0
            while not stop.is_set():
                step += 1
                calls = [
                    ("GET", "/api/v1/vms/", None),
                    ("GET", f"/api/v1/vms/{vm.pk}/", None),
                    ("GET", "/api/v1/users/me/", None),
                    ("PATCH", f"/api/v1/vms/{vm.pk}/", {"name": f"pg{index}-{step}"}),
                ]
                for method, path, body in calls:
                    sent_at = time.monotonic()
                    status, seconds = _request(port, token, method, path, body)
                    with lock:
                        statuses[status] += 1
                        slowest = max(slowest, seconds)
                        if method == "PATCH" and status == 200 and body is not None:
                            renamed[str(vm.pk)] = body["name"]
                        # The first request sent after a round of terminations and answered 200
                        # ends that round's recovery.
                        if status == 200 and awaiting.is_set() and sent_at >= (fault.injected_at or 0):
                            awaiting.clear()
                            fault.recovered()

        kills = 0

        def killer() -> None:
            nonlocal kills
            with psycopg.connect(url.replace("postgres://", "postgresql://"), autocommit=True) as conn:
                while not stop.wait(2.0):
                    rows = conn.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE application_name = %s AND pid <> pg_backend_pid()",
                        (APP_NAME,),
                    ).fetchall()
                    with lock:
                        kills += len(rows)
                        if rows and not awaiting.is_set():  # a round still unanswered keeps its start
                            fault.injected()
                            awaiting.set()

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        threads.append(threading.Thread(target=killer))
        for thread in threads:
            thread.start()
        time.sleep(LOAD_SECONDS)
        stop.set()
        for thread in threads:
            thread.join(60)
        fault.note(
            f"{sum(statuses.values())} requests, statuses {dict(statuses)}, {kills} backends terminated"
        )
        fault.note(
            f"slowest answer {slowest:.2f} s; {len(fault.recoveries)} rounds of terminations each "
            "followed by a 200"
        )
        assert kills > 0
        assert not awaiting.is_set(), "no request succeeded after the last round of terminations"
        errors = {status: count for status, count in statuses.items() if status >= 500}
        assert not errors, (errors, log.name)
        for vm_id, name in renamed.items():
            assert VM.objects.get(pk=vm_id).name == name
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def _up(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False
