"""The image store on ``make run``'s embedded SQLite: upload, the operators' command and delete work
there too (the store's locks are files of the store, not database locks)."""

import pytest

SCRIPT = """
import io
import subprocess
import tempfile
from pathlib import Path

import django

django.setup()

from django.core.management import call_command
from django.contrib.auth import get_user_model
from rest_framework.test import APIClient

from apps.accounts.services import token_create
from apps.images.store import store_dir
from apps.vms.models import Image

call_command("migrate", "--no-input", "-v", "0")
made = Path(tempfile.mkdtemp())
subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(made / "a.qcow2"), "16M"], check=True)
(made / "b.raw").write_bytes(b"\\x5a" * (1 << 20))
staff = get_user_model().objects.create_user("root", password="pw", is_staff=True)
client = APIClient()
client.credentials(HTTP_AUTHORIZATION="Token " + token_create(user=staff).secret)
created = client.post("/api/v1/images/", {"name": "a", "format": "qcow2"}, format="json")
assert created.status_code == 201, created.content
body = (made / "a.qcow2").read_bytes()
put = client.put(f"/api/v1/images/{created.json()['id']}/file/", body, content_type="application/octet-stream")
assert put.status_code == 200, put.content
assert Image.objects.get(name="a").status == "ready"
out = io.StringIO()
for _ in range(2):
    call_command("image_import", "b", str(made / "b.raw"), format="raw", stdout=out)
assert "imported" in out.getvalue() and "unchanged" in out.getvalue(), out.getvalue()
deleted = client.delete(f"/api/v1/images/{created.json()['id']}/")
assert deleted.status_code == 204, deleted.content
stored = sorted(p.name for p in store_dir().iterdir() if not p.name.startswith("."))
assert stored == [Image.objects.get(name="b").sha256], stored
print("sqlite images ok")
"""


@pytest.mark.integration
def test_images_on_sqlite(run_on_sqlite) -> None:
    assert "sqlite images ok" in run_on_sqlite(SCRIPT)
