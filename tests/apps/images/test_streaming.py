"""A large upload through a real HTTP server thread (``live_server``) and the whole middleware chain:
the body is streamed to the store, never held in memory (the process's peak memory barely moves)."""

import hashlib
import http.client
import resource
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from apps.vms.models import Image

SIZE = 512 << 20


@pytest.mark.django_db(transaction=True)
def test_a_large_upload_is_streamed(live_server: Any, api: Any, store: Path, tmp_path: Path) -> None:
    created = api.post("/api/v1/images/", {"name": "big", "format": "raw"}, format="json").json()
    block = hashlib.sha256(b"seed").digest() * (1 << 15)  # 1 MiB, not all zeros
    path = tmp_path / "big.raw"
    with path.open("wb") as file:
        for _ in range(SIZE >> 20):
            file.write(block)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    address = urlsplit(live_server.url)
    connection = http.client.HTTPConnection(address.hostname or "", address.port, timeout=300)
    with path.open("rb") as body:
        connection.request(
            "PUT",
            f"/api/v1/images/{created['id']}/file/",
            body=body,
            headers={
                "Authorization": f"Token {api.token_secret}",
                "Content-Type": "application/octet-stream",
                "Content-Length": str(SIZE),
            },
        )
    response = connection.getresponse()
    assert response.status == 200, response.read()[:500]
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    image = Image.objects.get(pk=created["id"])
    assert (image.status, image.size_bytes, image.virtual_size_bytes) == ("ready", SIZE, SIZE)
    assert grown_mib < 128, f"peak memory grew by {grown_mib:.0f} MiB for a {SIZE >> 20} MiB upload"
