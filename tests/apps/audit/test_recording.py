"""Writes through the API leave one audit event each, refused ones included; reads leave none."""

from typing import Any

import orjson
import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from apps.audit.models import AuditEvent
from apps.migrations.models import Migration
from apps.monitoring.models import Alert, AlertRule
from apps.projects.services import personal_project
from apps.vms.models import VM
from tests.conftest import vm_payload

pytestmark = pytest.mark.django_db


def _only_event() -> AuditEvent:
    events = list(AuditEvent.objects.all())
    assert len(events) == 1, [(event.action, event.status) for event in events]
    AuditEvent.objects.all().delete()
    return events[0]


def _row(event: AuditEvent) -> bytes:
    """Every column of the event's row, as text."""
    return orjson.dumps({field.name: str(getattr(event, field.attname)) for field in event._meta.fields})


@pytest.fixture
def running_vm(user: Any, node: Any, image: Any) -> VM:
    return VM.objects.create(
        owner=user,
        name="secret-vm",
        image=image,
        node=node,
        vcpus=1,
        memory_mb=64,
        disk_gb=1,
        state="running",
    )


def test_a_vm_create_is_recorded_with_actor_target_and_the_answers_request_id(api, user, node, image):
    response = api.post("/api/v1/vms/", vm_payload(), format="json", HTTP_X_REQUEST_ID="req-create-1")
    assert response.status_code == 202
    event = _only_event()
    assert (event.action, event.target_type, event.target_id) == ("vm.create", "vm", response.json()["id"])
    assert (event.actor_id, event.actor_name) == (user.pk, "alice")
    assert (event.status, event.outcome) == (202, "ok")
    assert event.request_id == response["X-Request-ID"] == "req-create-1"
    assert event.detail["values"] == {
        "name": "web-1",
        "image": "debian-12",
        "vcpus": 2,
        "memory_mb": 1024,
        "disk_gb": 10,
    }
    assert (event.project_id, event.project_name) == (personal_project(user).pk, "~alice")  # where it acted
    assert (timezone.now() - event.timestamp).total_seconds() < 60


def test_a_minted_request_id_is_the_one_the_answer_carries(api, node, image):
    response = api.post("/api/v1/vms/", vm_payload(), format="json")
    event = _only_event()
    assert len(event.request_id) == 32 and event.request_id == response["X-Request-ID"]


def test_a_rename_records_the_new_name(api, running_vm):
    assert api.patch(f"/api/v1/vms/{running_vm.pk}/", {"name": "web-2"}, format="json").status_code == 200
    event = _only_event()
    assert (event.action, event.target_id, event.outcome) == ("vm.update", str(running_vm.pk), "ok")
    assert event.detail == {"fields": ["name"], "values": {"name": "web-2"}}


def test_power_actions_are_recorded_and_a_refused_one_names_its_error(api, running_vm):
    assert api.post(f"/api/v1/vms/{running_vm.pk}/stop/").status_code == 202
    event = _only_event()
    assert (event.action, event.target_id, event.status, event.outcome) == (
        "vm.stop",
        str(running_vm.pk),
        202,
        "ok",
    )
    assert api.post(f"/api/v1/vms/{running_vm.pk}/start/").status_code == 409
    event = _only_event()
    assert (event.action, event.status, event.outcome, event.detail) == (
        "vm.start",
        409,
        "refused",
        {"error": "invalid_state"},
    )


def test_an_attempt_on_another_users_vm_is_recorded_as_refused_without_its_data(
    other_api, other_user, running_vm
):
    assert (
        other_api.patch(f"/api/v1/vms/{running_vm.pk}/", {"name": "hijacked"}, format="json").status_code
        == 404
    )
    event = _only_event()
    assert (event.actor_name, event.action, event.target_id) == ("bob", "vm.update", str(running_vm.pk))
    assert (event.status, event.outcome) == (404, "refused")
    assert event.detail == {"fields": ["name"], "values": {"name": "hijacked"}, "error": "not_found"}
    assert other_api.post(f"/api/v1/vms/{running_vm.pk}/reboot/").status_code == 404
    event = _only_event()
    assert (event.action, event.outcome, event.detail) == ("vm.reboot", "refused", {"error": "not_found"})
    row = _row(event)
    assert b"secret-vm" not in row and b"alice" not in row and b"node1" not in row


def test_a_batch_is_one_event_naming_the_batch_and_its_vms(api, node, image):
    items = [vm_payload(name=f"b{index}", vcpus=1, memory_mb=64, disk_gb=1) for index in range(3)]
    body = api.post("/api/v1/vms/batch/", {"vms": items}, format="json").json()
    event = _only_event()
    assert (event.action, event.target_type, event.target_id) == (
        "batch.create",
        "batch",
        body["batch"]["id"],
    )
    assert event.detail["vms"] == [vm["id"] for vm in body["vms"]]
    ids = [vm["id"] for vm in body["vms"][:2]]
    response = api.generic(
        "DELETE", "/api/v1/vms/batch/", orjson.dumps({"ids": ids}), content_type="application/json"
    )
    assert response.status_code == 202
    event = _only_event()
    assert (event.action, event.target_id, event.detail["vms"]) == (
        "batch.delete",
        response.json()["batch"]["id"],
        ids,
    )


def test_a_refused_batch_keeps_the_ids_asked_for(other_api, running_vm):
    body = {"vms": [{"id": str(running_vm.pk), "name": "hijacked"}]}
    assert other_api.put("/api/v1/vms/batch/", body, format="json").status_code == 400
    event = _only_event()
    assert (event.action, event.target_id, event.outcome) == ("batch.update", "", "refused")
    assert event.detail == {"fields": ["vms"], "error": "invalid", "vms": [str(running_vm.pk)]}


def test_a_migration_request_and_its_cancel_are_recorded(api, running_vm, make_node):
    make_node("dest")
    response = api.post(
        f"/api/v1/vms/{running_vm.pk}/migrate/", {"dest_node": "dest", "mode": "cold"}, format="json"
    )
    assert response.status_code == 202, response.json()
    migration_id = response.json()["id"]
    event = _only_event()
    assert (event.action, event.target_type, event.target_id) == ("vm.migrate", "vm", str(running_vm.pk))
    assert event.detail["result"] == migration_id
    assert event.detail["values"] == {"dest_node": "dest", "mode": "cold"}
    assert api.post(f"/api/v1/migrations/{migration_id}/cancel/").status_code == 202
    event = _only_event()
    assert (event.action, event.target_type, event.target_id, event.outcome) == (
        "migration.cancel",
        "migration",
        migration_id,
        "ok",
    )
    assert Migration.objects.get(pk=migration_id).status == "cancelled"


def test_staff_writes_on_nodes_images_and_alerts_are_recorded(staff_api, node):
    assert (
        staff_api.patch(f"/api/v1/nodes/{node.pk}/", {"status": "maintenance"}, format="json").status_code
        == 200
    )
    event = _only_event()
    assert (event.action, event.target_id, event.detail["values"]) == (
        "node.update",
        str(node.pk),
        {"status": "maintenance"},
    )
    assert staff_api.post(f"/api/v1/nodes/{node.pk}/drain/").status_code == 202
    event = _only_event()
    assert (event.action, event.target_id) == ("node.drain", str(node.pk))
    image = staff_api.post(
        "/api/v1/images/",
        {"name": "img", "kind": "disk", "format": "qcow2", "path": "/x.qcow2"},
        format="json",
    ).json()
    event = _only_event()
    assert (event.action, event.target_id) == ("image.create", str(image["id"]))
    rule = AlertRule.objects.create(name="audit-rule", metric="node.cpu_percent", threshold=1)
    alert = Alert.objects.create(rule=rule, severity="warning", value=2, started_at=timezone.now())
    assert staff_api.post(f"/api/v1/alerts/{alert.pk}/acknowledge/").status_code == 200
    event = _only_event()
    assert (event.action, event.target_id) == ("alert.acknowledge", str(alert.pk))
    assert staff_api.delete(f"/api/v1/alert-rules/{rule.pk}/").status_code == 204
    event = _only_event()
    assert (event.action, event.target_id, event.status) == ("alert_rule.delete", str(rule.pk), 204)


def test_a_normal_user_refused_a_staff_write_is_recorded(api, node):
    assert api.post(f"/api/v1/nodes/{node.pk}/drain/").status_code == 403
    event = _only_event()
    assert (event.action, event.actor_name, event.outcome, event.detail) == (
        "node.drain",
        "alice",
        "refused",
        {"error": "permission_denied"},
    )


def test_reads_unauthenticated_and_unknown_methods_leave_no_event(api, client, running_vm):
    for url in (
        "/api/v1/vms/",
        f"/api/v1/vms/{running_vm.pk}/",
        "/api/v1/batches/",
        "/api/v1/migrations/",
        "/api/v1/nodes/",
        "/api/v1/audit/",
        "/api/v1/users/me/",
    ):
        assert api.get(url).status_code == 200, url
        assert api.options(url).status_code == 200, url
    assert client.post("/api/v1/vms/", vm_payload(), content_type="application/json").status_code == 401
    assert api.get(f"/api/v1/vms/{running_vm.pk}/stop/").status_code == 405
    assert not AuditEvent.objects.exists()


def test_an_audited_request_costs_one_insert(api, running_vm):
    with CaptureQueriesContext(connection) as captured:
        assert api.post(f"/api/v1/vms/{running_vm.pk}/reboot/").status_code == 202
    audit = [query["sql"] for query in captured if "audit_events" in query["sql"]]
    assert len(audit) == 1 and audit[0].startswith("INSERT")
    event = _only_event()
    assert event.actor_name == "alice"


def test_a_token_request_is_recorded_without_the_password_or_the_token(client, user):
    password = "pw-correct-horse"
    response = client.post(
        "/api/v1/auth/token/", {"username": "alice", "password": password}, content_type="application/json"
    )
    assert response.status_code == 200
    token = response.json()["token"]
    event = _only_event()
    assert (event.action, event.outcome, event.actor_id) == ("token.create", "ok", None)
    assert event.detail == {"fields": ["username", "password"], "values": {"username": "alice"}}
    wrong = "pw-wrong-guess"
    response = client.post(
        "/api/v1/auth/token/", {"username": "alice", "password": wrong}, content_type="application/json"
    )
    assert response.status_code == 400
    refused = _only_event()
    assert (refused.action, refused.outcome) == ("token.create", "refused")
    for recorded in (event, refused):
        row = _row(recorded)
        assert password.encode() not in row and wrong.encode() not in row and token.encode() not in row


def test_text_postgresql_refuses_is_cleaned_before_it_is_recorded(api, node, image):
    body = b'{"name": "a\\u0000b\\ud800", "image": "debian-12", "vcpus": 1, "memory_mb": 64, "disk_gb": 1, "\\u0000x": 1}'
    response = api.generic("POST", "/api/v1/vms/", body, content_type="application/json")
    assert response.status_code == 400
    event = _only_event()
    assert (event.action, event.outcome) == ("vm.create", "refused")
    assert event.detail["values"]["name"] == "ab?" and "x" in event.detail["fields"]
    assert api.patch(f"/api/v1/nodes/{'9' * 10}%00{'9' * 70}/", {}, format="json").status_code == 403
    assert _only_event().target_id == "9" * 64
