"""The embedded SQLite setup (``make run`` without DATABASE_URL): the VM API works there too.

Reads by fixed SQL (``reads.py``), the scheduler's conditional UPDATE and COPY are PostgreSQL's; on
SQLite the ORM paths answer. This runs the API in a separate process against a fresh SQLite file.
"""

import pytest

SCRIPT = """
import django

django.setup()

from django.core.management import call_command

call_command("migrate", "--no-input", "-v", "0")

from django.contrib.auth import get_user_model
from rest_framework.test import APIClient

from apps.accounts.services import token_create
from apps.vms.models import VM, Image, Node

Node.objects.create(name="n1", address="h", dwcp_address="h:1", vcpus=400, memory_mb=409600, disk_gb=4000)
Image.objects.create(name="img", kind="disk", format="qcow2", path="/x.qcow2")
user = get_user_model().objects.create_user("alice", password="pw")
client = APIClient()
client.credentials(HTTP_AUTHORIZATION="Token " + token_create(user=user).secret)
item = {"image": "img", "vcpus": 1, "memory_mb": 64, "disk_gb": 1}
created = client.post("/api/v1/vms/", {"name": "one", **item}, format="json")
assert created.status_code == 202, created.content
vm_id = created.json()["id"]
(nic,) = created.json()["nics"]  # the project's default network, made on first use
assert nic["network"] == "default" and nic["ipv4"] == "10.0.0.2", nic
batch = client.post("/api/v1/vms/batch/", {"vms": [{"name": f"b{i}", **item} for i in range(60)]}, format="json")
assert batch.status_code == 202, batch.content
for _ in range(2):  # a miss, then the cached page (the fast path's hit)
    page = client.get("/api/v1/vms/", HTTP_ACCEPT="application/json")
    assert page.status_code == 200, page.content
    assert len(page.json()["results"]) == 50 and page.json()["next"], page.json()
for _ in range(2):
    detail = client.get(f"/api/v1/vms/{vm_id}/", HTTP_ACCEPT="application/json")
    assert detail.status_code == 200 and detail.json()["name"] == "one", detail.content
    assert detail.json()["nics"] == [nic], detail.content
assert all(len(vm["nics"]) == 1 for vm in page.json()["results"]), page.content
two = client.post(
    "/api/v1/networks/", {"name": "two", "cidr": "10.9.0.0/24"}, format="json"
)
assert two.status_code == 201, two.content
both = client.post("/api/v1/vms/", {"name": "both", "networks": ["two", "default"], **item}, format="json")
assert [n["network"] for n in both.json()["nics"]] == ["two", "default"], both.content
listed = client.get("/api/v1/vms/?name=both", HTTP_ACCEPT="application/json").json()["results"]
assert listed[0]["nics"] == both.json()["nics"], listed
renamed = client.patch(f"/api/v1/vms/{vm_id}/", {"name": "renamed"}, format="json")
assert renamed.status_code == 200, renamed.content
assert client.get(f"/api/v1/vms/{vm_id}/").json()["name"] == "renamed"
assert client.get(f"/api/v1/vms/{VM.objects.exclude(pk=vm_id).first().pk}/").status_code == 200
missing = client.get("/api/v1/vms/00000000-0000-0000-0000-000000000000/", HTTP_ACCEPT="application/json")
assert missing.status_code == 404, missing.content
assert Node.objects.get().allocated_vcpus == 62
print("sqlite ok")
"""


@pytest.mark.integration
def test_vm_api_on_sqlite(run_on_sqlite) -> None:
    assert "sqlite ok" in run_on_sqlite(SCRIPT)
