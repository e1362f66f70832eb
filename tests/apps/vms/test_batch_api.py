"""Batch create, update and delete: all-or-nothing validation, per-item status, the 1000-item limit."""

import pytest

from apps.networks.services import network_create
from apps.projects.services import personal_project
from apps.vms.models import VM, BatchOperation
from apps.vms.services import vm_record_report
from tests.conftest import set_quota, vm_payload

pytestmark = pytest.mark.django_db


@pytest.fixture
def two_nodes(make_node):
    return make_node("n1", vcpus=4000, memory_mb=4_000_000, disk_gb=100_000), make_node(
        "n2", vcpus=4000, memory_mb=4_000_000, disk_gb=100_000
    )


def test_batch_create_of_1000_is_one_transaction(api, two_nodes, image, user):
    # How fast it is is measured by bench/api ("POST batch of 1000"), not here.

    set_quota(user, max_vms=1000, max_vcpus=4000, max_memory_mb=4_000_000)
    # A default network is a /24: a thousand NICs need a bigger one.
    network_create(project_id=personal_project(user).pk, name="big", cidr="10.40.0.0/22")
    items = [
        vm_payload(name=f"vm-{i}", memory_mb=256, vcpus=1, disk_gb=1, networks=["big"]) for i in range(1000)
    ]
    response = api.post("/api/v1/vms/batch/", {"vms": items}, format="json")
    assert response.status_code == 202, response.json()
    body = response.json()
    assert body["batch"]["total"] == 1000
    assert body["batch"]["counts"] == {"pending": 1000, "succeeded": 0, "failed": 0}
    assert len(body["vms"]) == 1000
    assert {vm["node"] for vm in body["vms"]} == {"n1", "n2"}
    assert VM.objects.count() == 1000
    assert len({vm["nics"][0]["ipv4"] for vm in body["vms"]}) == 1000


def test_batch_reports_every_bad_item_by_index_and_creates_nothing(api, two_nodes, image):
    items = [
        vm_payload(name="ok-1"),
        vm_payload(name="bad name"),
        vm_payload(name="ok-1"),
        vm_payload(vcpus=0),
    ]
    items[3]["name"] = "ok-3"
    response = api.post("/api/v1/vms/batch/", {"vms": items}, format="json")
    assert response.status_code == 400
    fields = response.json()["error"]["fields"]
    assert "vms[1].name" in fields and "vms[3].vcpus" in fields
    assert not VM.objects.exists()
    response = api.post(
        "/api/v1/vms/batch/", {"vms": [vm_payload(name="a"), vm_payload(name="a")]}, format="json"
    )
    assert response.status_code == 400
    assert "vms[1].name" in response.json()["error"]["fields"]
    assert not VM.objects.exists() and not BatchOperation.objects.exists()


def test_batch_over_the_limit_is_413(api, two_nodes, image):
    items = [vm_payload(name=f"vm-{i}") for i in range(1001)]
    response = api.post("/api/v1/vms/batch/", {"vms": items}, format="json")
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "too_many_items"


def test_batch_beyond_capacity_creates_nothing(api, make_node, image):
    make_node("small", vcpus=4, memory_mb=4096, disk_gb=100)
    items = [vm_payload(name=f"vm-{i}") for i in range(3)]
    response = api.post("/api/v1/vms/batch/", {"vms": items}, format="json")
    assert response.status_code == 409
    assert "item 2" in response.json()["error"]["message"]
    assert not VM.objects.exists()


def test_batch_status_follows_node_reports(api, two_nodes, image):
    body = api.post(
        "/api/v1/vms/batch/", {"vms": [vm_payload(name=f"vm-{i}") for i in range(3)]}, format="json"
    ).json()
    batch_id = body["batch"]["id"]
    first, second, third = body["vms"]
    vm_record_report(
        vm_id=first["id"], operation="create", ok=True, state="running", node=first["node"], reason=""
    )
    detail = api.get(f"/api/v1/batches/{batch_id}/").json()
    assert detail["status"] == "running"
    assert detail["counts"] == {"pending": 2, "succeeded": 1, "failed": 0}
    assert [item["status"] for item in detail["items"]] == ["succeeded", "pending", "pending"]
    vm_record_report(
        vm_id=second["id"], operation="create", ok=True, state="running", node=second["node"], reason=""
    )
    vm_record_report(
        vm_id=third["id"], operation="create", ok=False, state="error", node=third["node"], reason="boom"
    )
    detail = api.get(f"/api/v1/batches/{batch_id}/").json()
    assert detail["status"] == "partial"
    assert detail["items"][2]["error"] == "boom"


def test_batch_update_and_delete(api, other_api, two_nodes, image):
    vms = api.post(
        "/api/v1/vms/batch/", {"vms": [vm_payload(name=f"vm-{i}") for i in range(3)]}, format="json"
    ).json()["vms"]
    ids = [vm["id"] for vm in vms]
    response = api.put(
        "/api/v1/vms/batch/",
        {"vms": [{"id": ids[0], "name": "renamed"}, {"id": ids[1], "vcpus": 8}]},
        format="json",
    )
    assert response.status_code == 400  # resizing a pending VM: the whole batch is refused
    assert "vms[1]" in response.json()["error"]["fields"]
    assert VM.objects.get(pk=ids[0]).name == "vm-0"
    response = api.put("/api/v1/vms/batch/", {"vms": [{"id": ids[0], "name": "renamed"}]}, format="json")
    assert response.status_code == 202
    assert response.json()["batch"]["status"] == "completed"
    assert VM.objects.get(pk=ids[0]).name == "renamed"
    assert other_api.delete("/api/v1/vms/batch/", {"ids": ids}, format="json").status_code == 400
    response = api.delete("/api/v1/vms/batch/", {"ids": ids}, format="json")
    assert response.status_code == 202
    assert {vm["state"] for vm in response.json()["vms"]} == {"deleting"}
    assert other_api.get(f"/api/v1/batches/{response.json()['batch']['id']}/").status_code == 404
