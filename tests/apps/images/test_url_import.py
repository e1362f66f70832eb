"""URL imports against a local HTTP server with Range support written for the test: stored like an
upload, resumed from the held offset after a cut, refused files and HTTP errors fail the image with
the reason, other schemes (also by redirect) are refused; once through a real control worker."""

import hashlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

from apps.audit.models import AuditEvent
from apps.images import downloads
from apps.vms.models import Image
from tests.apps.images.conftest import stored_files


class Files:
    """What the server serves (path -> bytes), how many bytes it sends before cutting the next
    connections (``cut_after``, ``cuts`` times), and the Range headers it was sent."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.redirects: dict[str, str] = {}
        self.cut_after = 0
        self.cuts = 0
        self.ranges: list[str | None] = []


def _handler(served: Files) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            if self.path in served.redirects:
                self.send_response(302)
                self.send_header("Location", served.redirects[self.path])
                self.end_headers()
                return
            data = served.files.get(self.path)
            if data is None:
                self.send_error(404)
                return
            wanted = self.headers.get("Range")
            served.ranges.append(wanted)
            start = int(wanted.removeprefix("bytes=").rstrip("-")) if wanted else 0
            if start >= len(data):
                self.send_error(416)
                return
            self.send_response(206 if wanted else 200)
            if wanted:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            body = data[start:]
            if served.cuts:
                served.cuts -= 1
                self.wfile.write(body[: served.cut_after])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

    return Handler


@pytest.fixture
def http_files() -> Iterator[tuple[Files, str]]:
    served = Files()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(served))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield served, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _importing(client: Any, url: str, **fields: Any) -> dict[str, Any]:
    body = {"name": "img", "format": "qcow2", "source_url": url, **fields}
    response = client.post("/api/v1/images/", body, format="json")
    assert response.status_code == 201, response.content
    assert response.json()["status"] == "importing"
    return response.json()


@pytest.mark.django_db
def test_a_url_import_resumes_after_cuts(
    api: Any, store: Path, disks: Callable[..., Path], http_files: tuple[Files, str], monkeypatch: Any
) -> None:
    monkeypatch.setattr(downloads, "FIRST_PAUSE", 0.01)
    served, base = http_files
    data = disks("qcow2", size="2G").read_bytes()
    served.files["/disk.qcow2"] = data
    served.cut_after, served.cuts = 50_000, 2
    image = _importing(api, f"{base}/disk.qcow2", sha256=hashlib.sha256(data).hexdigest())
    downloads.import_url(image["id"])
    stored = Image.objects.get(pk=image["id"])
    assert (stored.status, stored.sha256, stored.size_bytes) == (
        "ready",
        hashlib.sha256(data).hexdigest(),
        len(data),
    )
    assert stored.virtual_size_bytes == 2 * 1024**3 and stored.min_disk_gb == 2
    assert served.ranges == [None, "bytes=50000-", "bytes=100000-"]
    assert stored_files(store) == [stored.sha256]
    assert AuditEvent.objects.get(action="image.upload").status == 200


@pytest.mark.django_db
def test_a_refused_or_unreachable_file_fails_the_image(
    api: Any, store: Path, disks: Callable[..., Path], http_files: tuple[Files, str], monkeypatch: Any
) -> None:
    monkeypatch.setattr(downloads, "FIRST_PAUSE", 0.01)
    monkeypatch.setitem(settings.NOVACRON, "IMAGE_URL_ATTEMPTS", 2)
    served, base = http_files
    served.files["/backing.qcow2"] = disks("backing").read_bytes()
    served.redirects["/to-ftp"] = "ftp://127.0.0.1/x.qcow2"
    served.redirects["/to-file"] = "file:///etc/passwd"
    closed = f"http://127.0.0.1:{_closed_port()}/x.qcow2"
    for name, url, words in (
        ("hostile", f"{base}/backing.qcow2", "backing file"),
        ("missing", f"{base}/missing.qcow2", "HTTP 404"),
        ("ftp", f"{base}/to-ftp", "redirect to a non-http(s) URL 'ftp://"),
        ("file", f"{base}/to-file", "'file:///etc/passwd' is not allowed"),
        ("closed", closed, "failed after 2 tries"),
    ):
        image = _importing(api, url, name=name)
        downloads.import_url(image["id"])
        row = Image.objects.get(pk=image["id"])
        assert row.status == "failed" and words in row.status_reason, (name, row.status_reason)
        assert api.get(f"/api/v1/images/{image['id']}/").json()["status_reason"] == row.status_reason
    assert stored_files(store) == []
    assert AuditEvent.objects.filter(action="image.upload", outcome="refused").count() == 5


@pytest.mark.django_db
def test_a_url_import_above_the_size_limit_fails(
    api: Any, store: Path, http_files: tuple[Files, str], monkeypatch: Any
) -> None:
    monkeypatch.setitem(settings.NOVACRON, "IMAGE_MAX_SIZE_GB", 0)
    served, base = http_files
    served.files["/big.raw"] = b"\0" * 4096
    image = _importing(api, f"{base}/big.raw", format="raw")
    downloads.import_url(image["id"])
    row = Image.objects.get(pk=image["id"])
    assert row.status == "failed" and "up to 0 GiB" in row.status_reason
    assert stored_files(store) == []


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _database_url() -> str:
    db = settings.DATABASES["default"]
    credentials = db["USER"] + (f":{db['PASSWORD']}" if db.get("PASSWORD") else "")
    return f"postgres://{credentials}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


@pytest.mark.django_db(transaction=True)
def test_a_url_import_through_a_real_control_worker(
    api: Any, store: Path, disks: Callable[..., Path], http_files: tuple[Files, str], tmp_path: Path
) -> None:
    served, base = http_files
    data = disks("raw", bytes=3 << 20).read_bytes()
    served.files["/disk.raw"] = data
    env = os.environ | {
        "DATABASE_URL": _database_url(),
        "IMAGE_STORE_DIR": str(store),
        "DJANGO_SETTINGS_MODULE": "novacron.settings.test",
    }
    log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "novacron", "worker", "-Q", "control", "-n", f"images{os.getpid()}@%h",
         "--pool", "threads", "--concurrency", "1", "--without-gossip", "--without-mingle", "--loglevel", "INFO"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        image = _importing(api, f"{base}/disk.raw", format="raw")
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            row = Image.objects.get(pk=image["id"])
            if row.status != "importing":
                break
            time.sleep(0.2)
        assert (row.status, row.status_reason) == ("ready", ""), (tmp_path / "worker.log").read_text()[-3000:]
        assert row.sha256 == hashlib.sha256(data).hexdigest() and stored_files(store) == [row.sha256]
    finally:
        worker.terminate()
        worker.wait(30)
        log.close()
