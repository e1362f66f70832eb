"""API logs: every request is logged through Redis (in batches per process), written in bulk, bounded, and
listed for staff."""

import math
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db import DatabaseError, ProgrammingError, connection, transaction
from django.test.utils import CaptureQueriesContext

from apps.monitoring import services
from apps.monitoring.keys import API_LOG_DROPPED, API_LOG_LIST, REQUEST_STATS, key
from apps.monitoring.models import APILog

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parents[3]


def _inserts(queries) -> int:
    return sum(1 for query in queries if query["sql"].startswith('INSERT INTO "api_logs"'))


def test_requests_write_no_log_row_until_the_flush_and_then_one_insert_per_batch(
    api, user, redis_client, monitoring
):
    monitoring["API_LOG_FLUSH_BATCH"] = batch = 25
    requests = 60
    with CaptureQueriesContext(connection) as during_requests:
        for _ in range(requests):
            assert api.get("/api/v1/users/me/").status_code == 200
    assert _inserts(during_requests.captured_queries) == 0
    assert APILog.objects.count() == 0
    assert redis_client.llen(key(API_LOG_LIST)) == requests

    with CaptureQueriesContext(connection) as during_flush:
        written = services.api_logs_flush(client=redis_client)
    assert written == requests
    inserts = _inserts(during_flush.captured_queries)
    assert 1 <= inserts <= math.ceil(requests / batch)
    print(f"\n{requests} requests -> {inserts} INSERTs (batch {batch})")
    logs = APILog.objects.all()
    assert logs.count() == requests
    assert {log.user_id for log in logs} == {user.pk}
    assert {log.endpoint for log in logs} == {"/api/v1/users/me/"}
    assert all(log.status == 200 and log.duration_ms > 0 and log.response_bytes > 0 for log in logs)
    assert len({log.request_id for log in logs}) == requests
    assert redis_client.llen(key(API_LOG_LIST)) == 0


def test_endpoint_is_the_route_pattern_and_the_request_id_is_honoured_or_minted(api, redis_client, node):
    vm_id = uuid.uuid4()
    answer = api.get(f"/api/v1/vms/{vm_id}/", HTTP_X_REQUEST_ID="trace-42")
    assert answer.status_code == 404
    assert answer["X-Request-ID"] == "trace-42"
    minted = api.get(f"/api/v1/nodes/{node.pk}/", HTTP_X_REQUEST_ID="bad id with spaces")
    assert minted["X-Request-ID"] != "bad id with spaces" and len(minted["X-Request-ID"]) == 32
    services.api_logs_flush(client=redis_client)
    by_request = {log.request_id: log for log in APILog.objects.all()}
    assert by_request["trace-42"].endpoint == "/api/v1/vms/{pk}/"
    assert by_request["trace-42"].status == 404
    assert by_request[minted["X-Request-ID"]].endpoint == "/api/v1/nodes/{pk}/"
    suffixed = api.get(f"/api/v1/vms/{vm_id}.json")
    assert suffixed.status_code == 404
    services.api_logs_flush(client=redis_client)
    newest = APILog.objects.order_by("-id").first()
    assert newest is not None and newest.endpoint == "/api/v1/vms/{pk}.{format}/"


def test_a_full_buffer_drops_and_counts_instead_of_growing(api, redis_client, monitoring):
    monitoring["API_LOG_BUFFER_MAX"] = 5
    for _ in range(8):
        api.get("/api/v1/users/me/")
    assert redis_client.llen(key(API_LOG_LIST)) == 5
    assert int(redis_client.get(key(API_LOG_DROPPED))) == 3


def test_entries_go_back_to_redis_when_the_insert_fails(api, redis_client):
    for _ in range(3):
        api.get("/api/v1/users/me/")
    buffered = redis_client.lrange(key(API_LOG_LIST), 0, -1)
    with pytest.raises(DatabaseError), transaction.atomic():
        # A failed statement leaves the transaction aborted: the INSERT must fail too.
        with connection.cursor() as cursor, pytest.raises(ProgrammingError):
            cursor.execute("SELECT * FROM no_such_table")
        services.api_logs_flush(client=redis_client)
    assert redis_client.lrange(key(API_LOG_LIST), 0, -1) == buffered
    assert services.api_logs_flush(client=redis_client) == 3


def test_a_malformed_entry_is_skipped_not_fatal(api, redis_client):
    redis_client.lpush(key(API_LOG_LIST), b"not json")
    api.get("/api/v1/users/me/")
    assert services.api_logs_flush(client=redis_client) == 1


def test_staff_list_api_logs_with_filters_and_cursor_pages(staff_api, api, user, redis_client):
    for _ in range(3):
        api.get("/api/v1/users/me/")
    api.get("/api/v1/nodes/")
    api.post("/api/v1/vms/", {}, format="json")  # 400
    services.api_logs_flush(client=redis_client)

    everything = staff_api.get("/api/v1/api-logs/").json()
    assert len(everything["results"]) == 5
    assert everything["results"][0]["endpoint"] == "/api/v1/vms/"  # newest first
    mine = staff_api.get("/api/v1/api-logs/", {"user": "alice", "method": "GET"}).json()["results"]
    assert len(mine) == 4
    failed = staff_api.get("/api/v1/api-logs/", {"status": 400}).json()["results"]
    assert [(log["method"], log["endpoint"], log["user"]) for log in failed] == [
        ("POST", "/api/v1/vms/", "alice")
    ]
    me = staff_api.get("/api/v1/api-logs/", {"endpoint": "/api/v1/users/me/"}).json()["results"]
    assert len(me) == 3
    page = staff_api.get("/api/v1/api-logs/", {"page_size": 2}).json()
    assert len(page["results"]) == 2 and page["next"]
    second = staff_api.get(page["next"]).json()
    assert len(second["results"]) == 2
    assert staff_api.get("/api/v1/api-logs/", {"since": "2999-01-01T00:00:00Z"}).json()["results"] == []


def test_api_logs_answer_400_for_bad_filters_and_403_for_non_staff(staff_api, api):
    bad = staff_api.get("/api/v1/api-logs/", {"status": "teapot", "method": "BREW", "since": "yesterday"})
    assert bad.status_code == 400
    body = bad.json()["error"]
    assert body["code"] == "invalid" and {"status", "method", "since"} <= set(body["fields"])
    assert api.get("/api/v1/api-logs/").status_code == 403


REDIS_DOWN_SCRIPT = """
import django

django.setup()
from django.test import Client
from prometheus_client import REGISTRY

answer = Client().get("/api/v1/vms/", HTTP_X_REQUEST_ID="while-redis-is-down")
assert answer.status_code == 401, answer.status_code
assert answer["X-Request-ID"] == "while-redis-is-down"
assert REGISTRY.get_sample_value("novacron_api_log_send_failures_total") == 1
for _ in range(3):  # within the back-off: no new connection attempt, still counted
    assert Client().get("/api/v1/vms/").status_code == 401
assert REGISTRY.get_sample_value("novacron_api_log_send_failures_total") == 4
print("served")
"""


def test_requests_are_served_when_redis_is_down_and_the_loss_is_counted(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"} | {
        "DJANGO_SETTINGS_MODULE": "novacron.settings.test",
        "REDIS_URL": "redis://127.0.0.1:1/0",  # nothing listens there
        "DATABASE_URL": f"sqlite:///{tmp_path / 'unused.sqlite3'}",
        "NOVACRON_VAR_DIR": str(tmp_path),
        "ALLOWED_HOSTS": "testserver",
    }
    run = subprocess.run(
        [sys.executable, "-c", REDIS_DOWN_SCRIPT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "served" in run.stdout


def test_every_response_carries_a_request_id(client):
    assert len(client.get("/healthz")["X-Request-ID"]) == 32


@pytest.fixture
def batched(redis_client: Any, monitoring: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Batched pushes, starting and ending with this process's buffer empty."""
    from apps.monitoring.middleware import push_api_logs

    push_api_logs()
    redis_client.delete(key(API_LOG_LIST), key(REQUEST_STATS))
    yield monitoring
    monitoring["API_LOG_PUSH_INTERVAL"] = 0
    push_api_logs()


def test_batched_entries_reach_redis_in_one_push_with_their_counters(api, redis_client, batched, node):
    from apps.monitoring.middleware import push_api_logs

    monitoring = batched
    monitoring["API_LOG_PUSH_INTERVAL"] = 3600  # the push thread sleeps through this test
    for _ in range(5):
        assert api.get("/api/v1/nodes/").status_code == 200
    assert redis_client.llen(key(API_LOG_LIST)) == 0  # still in the process's buffer
    push_api_logs()
    assert redis_client.llen(key(API_LOG_LIST)) == 5
    stats = redis_client.hgetall(key(REQUEST_STATS))
    assert int(stats[b"requests"]) == 5 and int(stats[b"errors"]) == 0


def test_the_push_thread_sends_the_buffer_within_its_interval(api, redis_client, batched, node):
    monitoring = batched
    monitoring["API_LOG_PUSH_INTERVAL"] = 0.05
    for _ in range(3):
        api.get("/api/v1/nodes/")
    deadline = time.monotonic() + 5
    while redis_client.llen(key(API_LOG_LIST)) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert redis_client.llen(key(API_LOG_LIST)) == 3


def test_a_full_process_buffer_drops_and_counts(api, redis_client, batched, node):
    from prometheus_client import REGISTRY

    from apps.monitoring.middleware import push_api_logs

    batched["API_LOG_PUSH_INTERVAL"] = 3600
    batched["API_LOG_BUFFER_MAX"] = 3
    failures = REGISTRY.get_sample_value("novacron_api_log_send_failures_total") or 0
    for _ in range(5):
        assert api.get("/api/v1/nodes/").status_code == 200
    push_api_logs()
    assert redis_client.llen(key(API_LOG_LIST)) == 3
    assert (REGISTRY.get_sample_value("novacron_api_log_send_failures_total") or 0) - failures == 2
