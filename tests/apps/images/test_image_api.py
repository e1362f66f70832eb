"""The image endpoints: who creates what, tenancy (another project's private image is 404 like an
unknown one), metadata changes, names, deletes (409 while used; the store file goes with its last
image), the audit trail and the schema."""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from apps.audit.models import AuditEvent
from apps.vms.models import VM, Image
from tests.apps.images.conftest import stored_files

pytestmark = pytest.mark.django_db


def _post(client: Any, **fields: Any) -> Any:
    return client.post("/api/v1/images/", {"name": "img", "format": "qcow2", **fields}, format="json")


def _upload(client: Any, image_id: int, data: bytes) -> Any:
    return client.put(f"/api/v1/images/{image_id}/file/", data=data, content_type="application/octet-stream")


def test_a_private_image_is_seen_in_its_project_only(
    api: Any, other_api: Any, staff_api: Any, store: Path
) -> None:
    mine = _post(api).json()
    catalog = _post(staff_api, name="catalog", visibility="shared").json()
    assert (catalog["project"], catalog["visibility"], catalog["status"]) == (None, "shared", "pending")
    url = f"/api/v1/images/{mine['id']}/"
    assert {i["name"] for i in api.get("/api/v1/images/").json()["results"]} == {"img", "catalog"}
    assert {i["name"] for i in other_api.get("/api/v1/images/").json()["results"]} == {"catalog"}
    assert {i["name"] for i in staff_api.get("/api/v1/images/").json()["results"]} == {"img", "catalog"}
    unknown = other_api.get("/api/v1/images/999999/")
    for response in (
        other_api.get(url),
        other_api.patch(url, {"os_type": "x"}, format="json"),
        other_api.delete(url),
        other_api.get(f"{url}file/"),
        _upload(other_api, mine["id"], b"x" * 512),
    ):
        assert response.status_code == 404 == unknown.status_code, response.content
        assert response.json() == unknown.json()
    assert api.get(url).status_code == 200 and staff_api.get(url).status_code == 200
    assert other_api.get(f"/api/v1/images/{catalog['id']}/").status_code == 200
    assert other_api.delete(f"/api/v1/images/{catalog['id']}/").status_code == 403
    assert Image.objects.filter(pk=mine["id"], status="pending").exists()


def test_users_create_private_images_only(api: Any, store: Path) -> None:
    for fields, words in (
        ({"visibility": "shared"}, "Only staff"),
        ({"path": "/etc/passwd"}, "Only staff"),
        ({"kind": "kernel", "kernel_path": "/boot/vmlinuz"}, "Only staff"),
    ):
        response = _post(api, **fields)
        assert response.status_code == 403 and words in response.json()["error"]["message"]
    assert not Image.objects.exists()


def test_a_reader_reads_and_cannot_write(team: Any, store: Path) -> None:
    _, clients = team(writer="member", reader="reader")
    as_writer, as_reader = clients["writer"], clients["reader"]
    refused = _post(as_reader)
    assert refused.status_code == 403 and "reader" in refused.json()["error"]["message"]
    created = _post(as_writer)
    assert created.status_code == 201 and created.json()["project"] == "team"
    url = f"/api/v1/images/{created.json()['id']}/"
    assert as_reader.get(url).status_code == 200
    assert as_reader.delete(url).status_code == 403
    assert _upload(as_reader, created.json()["id"], b"x" * 512).status_code == 403


def test_bad_creates_are_400s_naming_the_field(api: Any, store: Path) -> None:
    assert _post(api).status_code == 201
    for fields, field in (
        ({}, "name"),  # taken
        ({"name": "b", "format": ""}, "format"),
        ({"name": "c", "format": "vmdk"}, "format"),
        ({"name": "d", "sha256": "ABC"}, "sha256"),
        ({"name": "e", "source_url": "file:///etc/passwd"}, "source_url"),
        ({"name": "f", "source_url": "ftp://example.org/x.qcow2"}, "source_url"),
        ({"name": "g", "source_url": "http://"}, "source_url"),
        ({"name": "bad name"}, "name"),
        ({"name": "h", "min_disk_gb": -1}, "min_disk_gb"),
        ({"name": "i", "unknown": 1}, "unknown"),
    ):
        body = {"name": "img", "format": "qcow2", **fields}
        if body["format"] == "":
            del body["format"]
        response = api.post("/api/v1/images/", body, format="json")
        assert response.status_code == 400, (fields, response.content)
        assert field in response.json()["error"]["fields"], (fields, response.json())
    assert Image.objects.count() == 1


def test_metadata_changes_and_staff_only_visibility(api: Any, staff_api: Any, store: Path) -> None:
    image = _post(api).json()
    url = f"/api/v1/images/{image['id']}/"
    changed = api.patch(url, {"name": "renamed", "os_type": "linux", "os_version": "12"}, format="json")
    assert changed.status_code == 200
    assert (changed.json()["name"], changed.json()["os_version"]) == ("renamed", "12")
    assert api.patch(url, {"visibility": "shared"}, format="json").status_code == 403
    Image.objects.filter(pk=image["id"]).update(virtual_size_bytes=3 * 1024**3, min_disk_gb=3)
    small = api.patch(url, {"min_disk_gb": 2}, format="json")
    assert small.status_code == 400 and "at least 3 GiB" in small.json()["error"]["message"]
    assert api.patch(url, {"sha256": "0" * 64}, format="json").status_code == 400
    _post(staff_api, name="taken", visibility="shared")
    taken = api.patch(url, {"name": "taken"}, format="json")
    assert taken.status_code == 400 and "already exists" in taken.json()["error"]["fields"]["name"][0]
    assert staff_api.patch(url, {"visibility": "shared"}, format="json").json()["visibility"] == "shared"
    assert [e.action for e in AuditEvent.objects.order_by("id")][:2] == ["image.create", "image.update"]


def test_delete_is_refused_while_a_vm_uses_the_image(
    api: Any,
    user: Any,
    node: Any,
    store: Path,
    disks: Callable[..., Path],
    django_capture_on_commit_callbacks: Any,
) -> None:
    image = _post(api).json()
    assert _upload(api, image["id"], disks("qcow2").read_bytes()).status_code == 200
    copy = _post(api, name="copy").json()
    assert _upload(api, copy["id"], disks("qcow2").read_bytes()).status_code == 200  # the same content
    sha256 = Image.objects.get(pk=image["id"]).sha256
    assert stored_files(store) == [sha256]
    vm = VM.objects.create(
        owner=user,
        name="vm",
        image_id=image["id"],
        node=node,
        vcpus=1,
        memory_mb=64,
        disk_gb=1,
        state="running",
    )
    refused = api.delete(f"/api/v1/images/{image['id']}/")
    assert refused.status_code == 409 and "used by 1 VM" in refused.json()["error"]["message"]
    VM.objects.filter(pk=vm.pk).delete()
    with django_capture_on_commit_callbacks(execute=True):
        assert api.delete(f"/api/v1/images/{image['id']}/").status_code == 204
    assert stored_files(store) == [sha256]  # the copy still has it
    with django_capture_on_commit_callbacks(execute=True):
        assert api.delete(f"/api/v1/images/{copy['id']}/").status_code == 204
    assert stored_files(store) == []
    assert AuditEvent.objects.filter(action="image.delete", outcome="ok").count() == 2


def test_the_browsable_forms_and_the_schema(api: Any, store: Path) -> None:
    image = _post(api).json()
    for page in ("/api/v1/images/", f"/api/v1/images/{image['id']}/", f"/api/v1/images/{image['id']}/file/"):
        assert api.get(page, HTTP_ACCEPT="text/html").status_code == 200
    schema = api.get("/api/v1/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json").json()
    operations = schema["paths"]["/api/v1/images/{id}/file/"]
    assert "application/octet-stream" in operations["put"]["requestBody"]["content"]
    assert set(operations) >= {"get", "put"}


def test_a_vm_boots_only_from_a_ready_image_its_project_sees(
    api: Any, other_api: Any, node: Any, store: Path, disks: Callable[..., Path]
) -> None:
    from tests.conftest import vm_payload

    mine = _post(api).json()
    created = other_api.post("/api/v1/vms/", vm_payload("vm", image=mine["id"]), format="json")
    assert created.status_code == 400 and "No image" in created.json()["error"]["fields"]["image"][0]
    assert other_api.post("/api/v1/vms/", vm_payload("vm", image="img"), format="json").status_code == 400
    pending = api.post("/api/v1/vms/", vm_payload("vm", image="img"), format="json")
    assert pending.status_code == 400 and "not ready" in pending.json()["error"]["fields"]["image"][0]
    assert _upload(api, mine["id"], disks("qcow2").read_bytes()).status_code == 200
    assert api.post("/api/v1/vms/", vm_payload("vm", image="img"), format="json").status_code == 202
    assert other_api.post("/api/v1/vms/", vm_payload("vm", image="img"), format="json").status_code == 400
    assert VM.objects.count() == 1
