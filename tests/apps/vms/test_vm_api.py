"""The VM endpoints as a client sees them: shapes, states, tenancy, quotas, capacity and errors."""

import json
import uuid
from typing import Any

import pytest
import redis
from django.conf import settings

from apps.vms.models import VM, Node
from tests.conftest import set_quota, vm_payload

pytestmark = pytest.mark.django_db


def _queued_tasks(queue: str) -> list[str]:
    client = redis.Redis.from_url(settings.REDIS_URL)
    return [json.loads(raw)["headers"]["task"] for raw in client.lrange(queue, 0, -1)]


@pytest.fixture(autouse=True)
def _empty_node_queues() -> None:
    client = redis.Redis.from_url(settings.REDIS_URL)
    for key in client.scan_iter("node.*"):
        client.delete(key)


def test_create_returns_pending_vm_and_enqueues_create_on_its_node(
    api, node, image, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        response = api.post("/api/v1/vms/", vm_payload(), format="json")
    assert response.status_code == 202, response.json()
    body = response.json()
    assert body["state"] == "pending"
    assert body["node"] == "node1"
    assert body["image"] == "debian-12"
    assert body["owner"] == "alice"
    uuid.UUID(body["id"])
    # Newest first: the VM's network peers were sent before its create (its default network).
    assert _queued_tasks("node.node1") == ["novacron.node.vm_create", "novacron.node.network_peers"]
    raw = redis.Redis.from_url(settings.REDIS_URL).lrange("node.node1", 0, -1)[0]  # the create
    headers = json.loads(raw)["headers"]
    request_id = headers["kwargsrepr"].rpartition("'request_id': '")[2].rstrip("'}")
    assert headers["kwargsrepr"] == f"{{'vm': 'web-1' ({body['id']}), 'request_id': '{request_id}'}}"
    assert len(request_id) == 32
    node.refresh_from_db()
    assert (node.allocated_vcpus, node.allocated_memory_mb, node.allocated_disk_gb) == (2, 1024, 10)


def test_create_accepts_image_and_node_by_id(api, node, image):
    response = api.post("/api/v1/vms/", vm_payload(image=image.pk, node=node.pk), format="json")
    assert response.status_code == 202
    assert response.json()["node"] == node.name


def test_create_with_bad_fields_names_every_field_and_creates_nothing(api, node, image):
    response = api.post(
        "/api/v1/vms/", {"name": "bad name!", "image": "nope", "vcpus": 0, "memory_mb": "x"}, format="json"
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid"
    assert set(error["fields"]) == {"name", "image", "vcpus", "memory_mb", "disk_gb"}
    assert not VM.objects.exists()


def test_unknown_fields_are_refused(api, node, image):
    response = api.post("/api/v1/vms/", vm_payload(state="running"), format="json")
    assert response.status_code == 400
    assert response.json()["error"]["fields"] == {"state": ["Unknown field."]}


def test_malformed_json_and_wrong_media_type_are_4xx(api, node, image):
    response = api.post("/api/v1/vms/", data="{not json", content_type="application/json")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "parse_error"
    response = api.post("/api/v1/vms/", data="<vm/>", content_type="application/xml")
    assert response.status_code == 415
    assert response.json()["error"]["code"] == "unsupported_media_type"
    response = api.post("/api/v1/vms/", data=json.dumps([1, 2]), content_type="application/json")
    assert response.status_code == 400


def test_duplicate_name_is_refused(api, node, image):
    assert api.post("/api/v1/vms/", vm_payload(), format="json").status_code == 202
    response = api.post("/api/v1/vms/", vm_payload(), format="json")
    assert response.status_code == 400
    assert "name" in response.json()["error"]["fields"]


def test_no_capacity_is_409_and_creates_nothing(api, make_node, image):
    make_node("tiny", vcpus=1, memory_mb=512, disk_gb=5)
    response = api.post("/api/v1/vms/", vm_payload(), format="json")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "no_capacity"
    assert not VM.objects.exists()
    assert Node.objects.get(name="tiny").allocated_vcpus == 0


def test_down_node_is_not_used(api, make_node, image):
    make_node("down1", status="down")
    response = api.post("/api/v1/vms/", vm_payload(), format="json")
    assert response.status_code == 409


def test_scheduler_prefers_most_free_memory_and_spreads(api, make_node, image):
    make_node("small", memory_mb=8192)
    make_node("big", memory_mb=9216)
    placed = [
        api.post("/api/v1/vms/", vm_payload(name=f"vm{i}"), format="json").json()["node"] for i in range(4)
    ]
    # big leads by 1 GiB; once level, the tie goes to the node with more free vCPUs: they alternate.
    assert placed == ["big", "small", "big", "small"]


def test_quota_exceeded_is_403_and_creates_nothing(api, user, node, image):
    set_quota(user, max_vms=1, max_vcpus=100, max_memory_mb=100000)
    assert api.post("/api/v1/vms/", vm_payload(name="a"), format="json").status_code == 202
    response = api.post("/api/v1/vms/", vm_payload(name="b"), format="json")
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "quota_exceeded"
    assert VM.objects.count() == 1


def test_a_deleted_vm_frees_its_name_and_its_share_of_the_quota(api, user, node, image):
    from apps.vms.services import vm_record_report

    set_quota(user, max_vms=1, max_vcpus=100, max_memory_mb=100000)
    vm_id = api.post("/api/v1/vms/", vm_payload(name="a"), format="json").json()["id"]
    assert api.post("/api/v1/vms/", vm_payload(name="a"), format="json").status_code == 400  # taken
    api.delete(f"/api/v1/vms/{vm_id}/")
    assert api.post("/api/v1/vms/", vm_payload(name="b"), format="json").status_code == 403  # still counted
    vm_record_report(vm_id=vm_id, operation="delete", ok=True, state="deleted", reason="", node="node1")
    response = api.post("/api/v1/vms/", vm_payload(name="a"), format="json")
    assert response.status_code == 202
    assert sorted(VM.objects.filter(name="a").values_list("state", flat=True)) == ["deleted", "pending"]


def test_users_me_shows_quota_and_usage(api, node, image):
    api.post("/api/v1/vms/", vm_payload(), format="json")
    body = api.get("/api/v1/users/me/").json()
    assert body["username"] == "alice"
    assert body["quota"] == {"max_vms": 100, "max_vcpus": 400, "max_memory_mb": 819200}
    assert body["usage"] == {"vms": 1, "vcpus": 2, "memory_mb": 1024}


def test_tenants_never_see_each_others_vms(api, other_api, staff_api, node, image):
    vm_id = api.post("/api/v1/vms/", vm_payload(), format="json").json()["id"]
    assert other_api.get(f"/api/v1/vms/{vm_id}/").status_code == 404
    assert other_api.patch(f"/api/v1/vms/{vm_id}/", {"name": "x"}, format="json").status_code == 404
    assert other_api.delete(f"/api/v1/vms/{vm_id}/").status_code == 404
    assert other_api.post(f"/api/v1/vms/{vm_id}/start/").status_code == 404
    assert other_api.post(f"/api/v1/vms/{vm_id}/migrate/", {"mode": "cold"}, format="json").status_code == 404
    assert other_api.get("/api/v1/vms/").json()["results"] == []
    assert [vm["id"] for vm in staff_api.get("/api/v1/vms/").json()["results"]] == [vm_id]
    assert staff_api.get(f"/api/v1/vms/{vm_id}/").status_code == 200


def test_list_is_cursor_paginated_and_filtered(api, node, image):
    for i in range(5):
        api.post("/api/v1/vms/", vm_payload(name=f"vm{i}"), format="json")
    page = api.get("/api/v1/vms/?page_size=2").json()
    assert set(page) == {"next", "previous", "results"}
    assert [vm["name"] for vm in page["results"]] == ["vm4", "vm3"]
    second = api.get(page["next"]).json()
    assert [vm["name"] for vm in second["results"]] == ["vm2", "vm1"]
    assert api.get("/api/v1/vms/?name=vm3").json()["results"][0]["name"] == "vm3"
    assert len(api.get("/api/v1/vms/?node=node1").json()["results"]) == 5
    assert api.get("/api/v1/vms/?state=running").json()["results"] == []
    response = api.get("/api/v1/vms/?state=bogus")
    assert response.status_code == 400
    assert "state" in response.json()["error"]["fields"]


def _set_state(vm_id: Any, state: str) -> None:
    VM.objects.filter(pk=vm_id).update(state=state)


def test_start_stop_reboot_follow_the_state(api, node, image):
    vm_id = api.post("/api/v1/vms/", vm_payload(), format="json").json()["id"]
    response = api.post(f"/api/v1/vms/{vm_id}/start/")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "invalid_state"
    _set_state(vm_id, "running")
    assert api.post(f"/api/v1/vms/{vm_id}/start/").status_code == 409
    response = api.post(f"/api/v1/vms/{vm_id}/reboot/")
    assert response.status_code == 202
    assert response.json()["pending_action"] == "reboot"
    assert api.post(f"/api/v1/vms/{vm_id}/stop/").status_code == 409  # reboot still in progress


def test_patch_renames_and_resizes_only_when_stopped(api, node, image):
    vm_id = api.post("/api/v1/vms/", vm_payload(), format="json").json()["id"]
    assert api.patch(f"/api/v1/vms/{vm_id}/", {"name": "renamed"}, format="json").json()["name"] == "renamed"
    assert api.patch(f"/api/v1/vms/{vm_id}/", {"vcpus": 4}, format="json").status_code == 409
    _set_state(vm_id, "stopped")
    body = api.patch(f"/api/v1/vms/{vm_id}/", {"vcpus": 4, "memory_mb": 512}, format="json").json()
    assert (body["vcpus"], body["memory_mb"]) == (4, 512)
    node.refresh_from_db()
    assert (node.allocated_vcpus, node.allocated_memory_mb) == (4, 512)
    assert api.patch(f"/api/v1/vms/{vm_id}/", {"disk_gb": 5}, format="json").status_code == 400
    assert api.put(f"/api/v1/vms/{vm_id}/", vm_payload(), format="json").status_code == 405


def test_rename_answers_the_vm_as_its_detail_shows_it_and_refreshes_the_cached_reads(api, node, image):
    vm_id = api.post("/api/v1/vms/", vm_payload(), format="json").json()["id"]
    before = api.get(f"/api/v1/vms/{vm_id}/").json()  # cached now, as is the list below
    assert api.get("/api/v1/vms/").json()["results"][0]["name"] == "web-1"
    response = api.patch(f"/api/v1/vms/{vm_id}/", {"name": "renamed"}, format="json")
    assert response.status_code == 200
    body = response.json()
    assert body == api.get(f"/api/v1/vms/{vm_id}/").json()
    assert body == {**before, "name": "renamed", "updated_at": body["updated_at"]}
    assert body["updated_at"] > before["updated_at"]
    assert api.get("/api/v1/vms/").json()["results"][0]["name"] == "renamed"
    assert VM.objects.get(pk=vm_id).name == "renamed"


def test_rename_to_the_same_name_changes_nothing(api, node, image):
    vm_id = api.post("/api/v1/vms/", vm_payload(), format="json").json()["id"]
    before = VM.objects.get(pk=vm_id).updated_at
    response = api.patch(f"/api/v1/vms/{vm_id}/", {"name": "web-1"}, format="json")
    assert response.status_code == 200
    assert response.json()["name"] == "web-1"
    assert VM.objects.get(pk=vm_id).updated_at == before


def test_rename_to_a_taken_name_is_400_and_renames_nothing(api, other_api, node, image):
    first = api.post("/api/v1/vms/", vm_payload(name="one"), format="json").json()["id"]
    api.post("/api/v1/vms/", vm_payload(name="two"), format="json")
    other_api.post("/api/v1/vms/", vm_payload(name="three"), format="json")
    response = api.patch(f"/api/v1/vms/{first}/", {"name": "two"}, format="json")
    assert response.status_code == 400
    assert response.json()["error"]["fields"] == {"name": ["The project already has a VM named 'two'."]}
    assert VM.objects.get(pk=first).name == "one"
    # Names are per owner: another tenant's VM name is free for this one.
    assert api.patch(f"/api/v1/vms/{first}/", {"name": "three"}, format="json").status_code == 200


def test_rename_of_another_tenants_vm_is_404_and_staff_may_rename_it(api, other_api, staff_api, node, image):
    vm_id = api.post("/api/v1/vms/", vm_payload(), format="json").json()["id"]
    assert other_api.patch(f"/api/v1/vms/{vm_id}/", {"name": "stolen"}, format="json").status_code == 404
    assert VM.objects.get(pk=vm_id).name == "web-1"
    response = staff_api.patch(f"/api/v1/vms/{vm_id}/", {"name": "by-staff"}, format="json")
    assert response.status_code == 200
    assert response.json()["owner"] == "alice"
    assert api.get(f"/api/v1/vms/{vm_id}/").json()["name"] == "by-staff"


def test_rename_of_a_vm_being_deleted_is_409(api, node, image):
    vm_id = api.post("/api/v1/vms/", vm_payload(), format="json").json()["id"]
    api.delete(f"/api/v1/vms/{vm_id}/")
    response = api.patch(f"/api/v1/vms/{vm_id}/", {"name": "late"}, format="json")
    assert response.status_code == 409
    assert VM.objects.get(pk=vm_id).name == "web-1"


def test_delete_is_202_deleting_and_node_report_releases_capacity(api, node, image):
    from apps.vms.services import vm_record_report

    vm_id = api.post("/api/v1/vms/", vm_payload(), format="json").json()["id"]
    response = api.delete(f"/api/v1/vms/{vm_id}/")
    assert response.status_code == 202
    assert response.json()["state"] == "deleting"
    vm_record_report(vm_id=vm_id, operation="delete", ok=True, state="deleted", reason="", node="node1")
    vm_record_report(vm_id=vm_id, operation="delete", ok=True, state="deleted", reason="", node="node1")
    node.refresh_from_db()
    assert (node.allocated_vcpus, node.allocated_memory_mb, node.allocated_disk_gb) == (0, 0, 0)
    assert api.get(f"/api/v1/vms/{vm_id}/").json()["state"] == "deleted"
    assert api.get("/api/v1/vms/").json()["results"] == []
    assert api.delete(f"/api/v1/vms/{vm_id}/").status_code == 409


def test_failed_create_report_releases_capacity_and_explains(api, node, image):
    from apps.vms.services import vm_record_report

    vm_id = api.post("/api/v1/vms/", vm_payload(), format="json").json()["id"]
    vm_record_report(
        vm_id=vm_id, operation="create", ok=False, state="error", reason="qemu-img: no space", node="node1"
    )
    body = api.get(f"/api/v1/vms/{vm_id}/").json()
    assert body["state"] == "error"
    assert "qemu-img: no space" in body["state_reason"]
    assert body["node"] is None
    node.refresh_from_db()
    assert node.allocated_vcpus == 0
    assert api.delete(f"/api/v1/vms/{vm_id}/").json()["state"] == "deleted"


def test_report_from_the_wrong_node_is_ignored(api, node, image):
    from apps.vms.services import vm_record_report

    vm_id = api.post("/api/v1/vms/", vm_payload(), format="json").json()["id"]
    vm_record_report(vm_id=vm_id, operation="create", ok=True, state="running", reason="", node="elsewhere")
    assert VM.objects.get(pk=vm_id).state == "pending"
    vm_record_report(vm_id=vm_id, operation="create", ok=True, state="running", reason="", node="node1")
    assert VM.objects.get(pk=vm_id).state == "running"


def test_bad_ids_are_404_not_500(api):
    assert api.get("/api/v1/vms/not-a-uuid/").status_code == 404
    assert api.get(f"/api/v1/vms/{uuid.uuid4()}/").json()["error"]["code"] == "not_found"
    assert api.get("/api/v1/nope/").status_code == 404


def test_authentication_is_required(client, node, image):
    response = client.get("/api/v1/vms/")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "not_authenticated"
    response = client.get("/api/v1/vms/", HTTP_AUTHORIZATION="Token wrong")
    assert response.status_code == 401
