"""Migration webhooks: every state change is sent after commit, signed, to MIGRATION_WEBHOOK_URL.

A real HTTP server on loopback receives the POSTs; the delivery task runs in this process.
"""

import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest

from apps.migrations import services
from apps.migrations.choices import MigrationMode
from apps.migrations.models import MigrationEvent
from apps.migrations.tasks import migration_webhook_send
from apps.vms.models import VM, Node
from tests.conftest import vm_payload

pytestmark = pytest.mark.django_db

SECRET = "migration-hook-secret"


class _Receiver(BaseHTTPRequestHandler):
    received: list[tuple[Any, bytes]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.headers, body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def hook(settings) -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Receiver.received = []
    url = f"http://127.0.0.1:{server.server_port}/migrations"
    settings.NOVACRON = {
        **settings.NOVACRON,
        "MIGRATION_WEBHOOK_URL": url,
        "MIGRATION_WEBHOOK_SECRET": SECRET,
    }
    try:
        yield url
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def running_vm(api, make_node, image) -> VM:
    make_node("src")
    make_node("dst")
    vm_id = api.post("/api/v1/vms/", vm_payload(node="src"), format="json").json()["id"]
    VM.objects.filter(pk=vm_id).update(state="running")
    return VM.objects.get(pk=vm_id)


def test_each_state_change_is_sent_signed_after_commit(
    hook, running_vm, user, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks() as callbacks:
        migration = services.migration_request(
            vm=running_vm, requested_by=user, mode=MigrationMode.LIVE, dest_node=Node.objects.get(name="dst")
        )
        services.migrations_schedule()
        services.migration_cancel(migration=migration, actor="alice")
    events = list(MigrationEvent.objects.filter(migration=migration).order_by("pk"))
    assert [(event.from_status, event.to_status) for event in events] == [
        ("", "queued"),
        ("queued", "preparing"),
        ("preparing", "cancelled"),
    ]
    assert len(callbacks) >= len(events)  # nothing is sent before the change commits
    for event in events:
        assert migration_webhook_send(event_id=event.pk) == 204
    assert len(_Receiver.received) == 3
    payloads = []
    for headers, body in _Receiver.received:
        expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers["X-NovaCron-Signature"], expected)
        assert headers["Content-Type"] == "application/json"
        payloads.append(json.loads(body))
    assert [p["event"]["to_status"] for p in payloads] == ["queued", "preparing", "cancelled"]
    assert [p["event"]["id"] for p in payloads] == sorted(p["event"]["id"] for p in payloads)
    last = payloads[-1]
    assert last["event"]["actor"] == "alice"
    assert last["migration"] == {
        "id": str(migration.pk),
        "vm": str(running_vm.pk),
        "vm_name": running_vm.name,
        "source_node": "src",
        "dest_node": "dst",
        "mode": "live",
        "status": "cancelled",
        "phase": "",
        "error": last["migration"]["error"],
    }


def test_no_url_no_task_and_an_unreachable_receiver_is_retried(settings, running_vm, user, hook):
    settings.NOVACRON = {**settings.NOVACRON, "MIGRATION_WEBHOOK_URL": ""}
    migration = services.migration_request(
        vm=running_vm, requested_by=user, mode=MigrationMode.LIVE, dest_node=Node.objects.get(name="dst")
    )
    event = MigrationEvent.objects.filter(migration=migration).first()
    assert event is not None
    assert migration_webhook_send(event_id=event.pk) is None  # switched off: nothing sent
    assert _Receiver.received == []
    # A receiver that does not answer: the task fails with a network error, which Celery retries.
    settings.NOVACRON = {**settings.NOVACRON, "MIGRATION_WEBHOOK_URL": "http://127.0.0.1:9/unreachable"}
    retried_on = getattr(migration_webhook_send, "autoretry_for", ())
    assert any(issubclass(OSError, kind) for kind in retried_on)
    with pytest.raises(OSError):
        migration_webhook_send.run(event_id=event.pk)
