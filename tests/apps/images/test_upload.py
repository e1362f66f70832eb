"""Uploads through the API: whole and resumed files of real qemu-img images are stored by sha256;
every refused file is a 400 naming the reason, leaves nothing in the store and the image ``failed``
(and uploadable again); offsets, sizes and concurrent uploads are checked."""

import hashlib
import io
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.db import connection

from apps.audit.models import AuditEvent
from apps.images import imports
from apps.images.store import partial_path, store_path
from apps.vms.models import Image
from tests.apps.images.conftest import stored_files

pytestmark = pytest.mark.django_db


def _create(client: Any, **fields: Any) -> dict[str, Any]:
    response = client.post("/api/v1/images/", {"name": "img", "format": "qcow2", **fields}, format="json")
    assert response.status_code == 201, response.content
    return response.json()


def _put(client: Any, image_id: int, data: bytes, content_range: str | None = None) -> Any:
    headers = {"HTTP_CONTENT_RANGE": content_range} if content_range else {}
    return client.put(
        f"/api/v1/images/{image_id}/file/", data=data, content_type="application/octet-stream", **headers
    )


def test_a_qcow2_upload_is_stored_by_its_sha256(api: Any, store: Path, disks: Callable[..., Path]) -> None:
    data = disks("qcow2", size="3G").read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    image = _create(api, sha256=digest, os_type="linux", min_disk_gb=1)
    assert (image["status"], image["project"] is not None, image["visibility"]) == (
        "pending",
        True,
        "private",
    )
    response = _put(api, image["id"], data)
    assert response.status_code == 200, response.content
    body = response.json()
    assert (body["status"], body["sha256"], body["size_bytes"]) == ("ready", digest, len(data))
    assert body["virtual_size_bytes"] == 3 * 1024**3 and body["min_disk_gb"] == 3
    assert body["received_bytes"] is None and response["Upload-Offset"] == str(len(data))
    assert stored_files(store) == [digest] and store_path(digest).read_bytes() == data
    event = AuditEvent.objects.get(action="image.upload")
    assert (event.target_id, event.status) == (str(image["id"]), 200)
    again = _put(api, image["id"], data)
    assert again.status_code == 409 and "already has its file" in again.json()["error"]["message"]


def test_a_raw_upload_resumed_after_a_cut(api: Any, store: Path, disks: Callable[..., Path]) -> None:
    """The first part with Content-Range, a cut in the second (what arrived is kept), then the rest."""
    data = disks("raw", bytes=5 << 20).read_bytes()  # above the 2 MiB that middlewares keep in memory
    image = _create(api, format="raw")
    total = len(data)
    first = _put(api, image["id"], data[: 2 << 20], f"bytes 0-{(2 << 20) - 1}/{total}")
    assert first.status_code == 200 and first.json()["status"] == "uploading"
    assert first.json()["received_bytes"] == 2 << 20 and first.json()["size_bytes"] == total
    assert not AuditEvent.objects.filter(action="image.upload").exists()  # a chunk is not an event

    class Cut(io.BytesIO):
        def read(self, size: int | None = -1, /) -> bytes:
            if self.tell() >= 1 << 20:
                raise OSError("connection reset by peer")
            return super().read(size)

    row = Image.objects.get(pk=image["id"])
    chunk = imports.Chunk(2 << 20, total - (2 << 20), total)
    with pytest.raises(imports.InvalidInput, match="resume from there"):
        imports.receive(row, Cut(data[2 << 20 :]), chunk)
    offset = api.head(f"/api/v1/images/{image['id']}/file/")
    assert offset.status_code == 200 and offset["Upload-Offset"] == str(3 << 20)
    assert api.get(f"/api/v1/images/{image['id']}/file/").json() == {
        "received_bytes": 3 << 20,
        "size": total,
        "status": "uploading",
    }
    wrong = _put(api, image["id"], data[2 << 20 :], f"bytes {2 << 20}-{total - 1}/{total}")
    assert wrong.status_code == 409 and wrong.json()["received_bytes"] == 3 << 20
    assert wrong["Upload-Offset"] == str(3 << 20)
    rest = _put(api, image["id"], data[3 << 20 :], f"bytes {3 << 20}-{total - 1}/{total}")
    assert rest.status_code == 200, rest.content
    digest = hashlib.sha256(data).hexdigest()
    assert (rest.json()["status"], rest.json()["sha256"]) == ("ready", digest)
    assert rest.json()["virtual_size_bytes"] == total
    assert stored_files(store) == [digest]


@pytest.mark.parametrize(
    ("kind", "declared", "words"),
    [
        ("backing", "qcow2", "backing file"),
        ("data_file", "qcow2", "external data file"),
        ("qcow2", "raw", "is a qcow2 image, not raw"),
        ("raw", "qcow2", "is raw, not qcow2"),
        ("text", "qcow2", "is raw, not qcow2"),
        ("text", "raw", "512-byte sectors"),
    ],
)
def test_a_refused_file_is_a_400_and_leaves_nothing(
    api: Any, store: Path, disks: Callable[..., Path], kind: str, declared: str, words: str
) -> None:
    image = _create(api, format=declared)
    response = _put(api, image["id"], disks(kind).read_bytes())
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["code"] == "image_refused" and words in error["message"], error
    assert stored_files(store) == []
    row = Image.objects.get(pk=image["id"])
    assert (row.status, row.sha256, row.size_bytes) == ("failed", "", 0) and words in row.status_reason
    assert AuditEvent.objects.get(action="image.upload").outcome == "refused"


def test_a_failed_image_takes_a_new_upload(api: Any, store: Path, disks: Callable[..., Path]) -> None:
    image = _create(api)
    assert _put(api, image["id"], disks("backing").read_bytes()).status_code == 400
    fixed = _put(api, image["id"], disks("qcow2").read_bytes())
    assert fixed.status_code == 200 and fixed.json()["status"] == "ready"


def test_a_checksum_mismatch_is_refused(api: Any, store: Path, disks: Callable[..., Path]) -> None:
    image = _create(api, sha256="0" * 64)
    response = _put(api, image["id"], disks("qcow2").read_bytes())
    assert response.status_code == 400 and "not 000" in response.json()["error"]["message"]
    assert stored_files(store) == []


def test_a_virtual_size_above_the_limit_is_refused(
    api: Any, store: Path, disks: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from django.conf import settings

    monkeypatch.setitem(settings.NOVACRON, "IMAGE_MAX_VIRTUAL_SIZE_GB", 1)
    image = _create(api)
    response = _put(api, image["id"], disks("qcow2", size="2G").read_bytes())
    assert response.status_code == 400 and "above the limit of 1 GiB" in response.json()["error"]["message"]
    assert stored_files(store) == []


def test_a_file_above_the_size_limit_is_a_413(api: Any, store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from django.conf import settings

    monkeypatch.setitem(settings.NOVACRON, "IMAGE_MAX_SIZE_GB", 0)
    image = _create(api)
    response = _put(api, image["id"], b"x" * 1024)
    assert response.status_code == 413 and "up to 0 GiB" in response.json()["error"]["message"]
    big = _put(api, image["id"], b"x" * 1024, f"bytes 0-1023/{200 * 1024**3}")
    assert big.status_code == 413
    assert stored_files(store) == []


def test_bad_requests_are_4xx_with_a_message(api: Any, store: Path) -> None:
    image = _create(api)
    url = f"/api/v1/images/{image['id']}/file/"
    cases = [
        (_put(api, image["id"], b""), 400, "empty"),
        (_put(api, image["id"], b"abc", "bytes 0-9/100"), 400, "announces 10 bytes"),
        (_put(api, image["id"], b"abc", "bytes=0-2/3"), 400, "bytes START-END/TOTAL"),
        (_put(api, image["id"], b"abc", "bytes 2-0/3"), 400, "START <= END < TOTAL"),
        (api.put(url, {"a": 1}, format="json"), 415, ""),
    ]
    for response, code, words in cases:
        assert response.status_code == code, (response.status_code, response.content)
        assert words in response.json()["error"]["message"]
    assert stored_files(store) == []


def test_a_concurrent_upload_is_a_409(api: Any, store: Path, disks: Callable[..., Path]) -> None:
    """Another session holds the image's import lock (an upload in flight): this upload is refused."""
    image = _create(api)
    held, release = threading.Event(), threading.Event()

    def other_upload() -> None:
        try:
            with imports.import_lock(image["id"]):
                held.set()
                release.wait(30)
        finally:
            connection.close()

    thread = threading.Thread(target=other_upload)
    thread.start()
    try:
        assert held.wait(30)
        response = _put(api, image["id"], disks("qcow2").read_bytes())
        assert response.status_code == 409 and "in progress" in response.json()["error"]["message"]
        assert api.delete(f"/api/v1/images/{image['id']}/").status_code == 409
    finally:
        release.set()
        thread.join()
    assert _put(api, image["id"], disks("qcow2").read_bytes()).status_code == 200


def test_path_images_and_url_imports_take_no_upload(staff_api: Any, store: Path) -> None:
    path_image = staff_api.post(
        "/api/v1/images/", {"name": "legacy", "format": "qcow2", "path": "/srv/legacy.qcow2"}, format="json"
    ).json()
    assert path_image["status"] == "ready" and path_image["project"] is None
    response = _put(staff_api, path_image["id"], b"x" * 512)
    assert response.status_code == 409 and "registered by path" in response.json()["error"]["message"]
    assert not partial_path(path_image["id"]).exists()
