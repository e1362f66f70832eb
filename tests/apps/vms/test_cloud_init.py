"""cloud-init at the API: what a VM create takes (hostname, SSH keys, user data), what it refuses, what a
node is sent and what is never shown back; and which images a project may boot."""

import base64
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import redis
from django.conf import settings

from apps.projects.services import personal_project
from apps.vms import cloud_init, dispatch
from apps.vms.models import VM
from tests.conftest import vm_payload

pytestmark = pytest.mark.django_db


@pytest.fixture(scope="module")
def ssh_key(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real ed25519 public key made by ssh-keygen."""
    path = tmp_path_factory.mktemp("keys") / "id"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "alice@laptop", "-f", str(path)], check=True
    )
    return Path(f"{path}.pub").read_text().strip()


CONFIG = "#cloud-config\npackages: [htop]\nruncmd:\n  - echo secret-token-123 > /root/t\n"


def test_create_keeps_the_seed_shows_hostname_and_keys_and_never_the_user_data(
    api: Any, node: Any, image: Any, ssh_key: str
) -> None:
    response = api.post(
        "/api/v1/vms/",
        vm_payload(hostname="web-1.example.org", ssh_keys=[ssh_key], user_data=CONFIG),
        format="json",
    )
    assert response.status_code == 202, response.json()
    body = response.json()
    assert body["hostname"] == "web-1.example.org"
    assert body["ssh_keys"] == [ssh_key]
    assert "user_data" not in body and "secret-token-123" not in response.content.decode()
    detail = api.get(f"/api/v1/vms/{body['id']}/")
    assert detail.json()["hostname"] == "web-1.example.org"
    assert "secret-token-123" not in detail.content.decode()
    listed = api.get("/api/v1/vms/")
    assert "secret-token-123" not in listed.content.decode()
    vm = VM.objects.get(pk=body["id"])
    assert dispatch.vm_spec(vm)["seed"] == {
        "hostname": "web-1.example.org",
        "ssh_keys": [ssh_key],
        "user_data": CONFIG,
    }


def test_the_node_task_carries_the_user_data_but_its_shown_arguments_do_not(
    api: Any, node: Any, image: Any, django_capture_on_commit_callbacks: Any
) -> None:
    client = redis.Redis.from_url(settings.REDIS_URL)
    client.delete("node.node1")
    with django_capture_on_commit_callbacks(execute=True):
        response = api.post("/api/v1/vms/", vm_payload(user_data=CONFIG, networks=[]), format="json")
    assert response.status_code == 202, response.json()
    (raw,) = client.lrange("node.node1", 0, -1)
    message = json.loads(raw)
    assert "secret-token-123" not in json.dumps(message["headers"])  # what Flower and logs show
    assert message["properties"]["body_encoding"] == "base64"
    (_args, kwargs, _embed) = json.loads(base64.b64decode(message["body"]))
    assert kwargs["vm"]["seed"]["user_data"] == CONFIG


def test_a_vm_without_a_hostname_is_named_after_itself(api: Any, node: Any, image: Any) -> None:
    response = api.post("/api/v1/vms/", vm_payload(name="db_primary.1"), format="json")
    assert response.status_code == 202, response.json()
    assert response.json()["hostname"] == "db-primary-1"
    assert response.json()["ssh_keys"] == []
    vm = VM.objects.get(pk=response.json()["id"])
    assert dispatch.vm_spec(vm)["seed"] == {"hostname": "db-primary-1", "ssh_keys": [], "user_data": ""}


def test_a_kernel_image_gets_a_seed_only_when_asked(
    api: Any, node: Any, make_image: Any, ssh_key: str
) -> None:
    make_image("tiny", kind="kernel", path="", kernel_path="/srv/vmlinuz")
    plain = api.post("/api/v1/vms/", vm_payload(name="a", image="tiny"), format="json").json()
    keyed = api.post(
        "/api/v1/vms/", vm_payload(name="b", image="tiny", ssh_keys=[ssh_key]), format="json"
    ).json()
    assert "seed" not in dispatch.vm_spec(VM.objects.get(pk=plain["id"]))
    assert dispatch.vm_spec(VM.objects.get(pk=keyed["id"]))["seed"]["ssh_keys"] == [ssh_key]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("hostname", "-bad-", "RFC 1123"),
        ("hostname", "a" * 64, "RFC 1123"),
        ("hostname", "web_1", "RFC 1123"),
        ("ssh_keys", ["ssh-ed25519"], "Not an OpenSSH public key"),
        ("ssh_keys", ["ssh-dss AAAAB3NzaC1kc3MAAACBAP"], "Not an OpenSSH public key"),
        ("ssh_keys", ["ssh-ed25519 !!!notbase64"], "not valid base64"),
        ("ssh_keys", ["ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIDf3"], "not a ssh-rsa key"),
        ("ssh_keys", ["ssh-ed25519 AAAA\nssh-rsa AAAA"], "one line"),
        ("ssh_keys", ["x"] * 17, "no more than 16"),
        ("user_data", "hello", "must start with one of"),
        ("user_data", "#cloud-config\nusers: [\n", "not valid YAML at line"),
        ("user_data", "#cloud-config\n- just\n- a list\n", "YAML mapping"),
        ("user_data", "#!/bin/sh\n" + "x" * cloud_init.MAX_USER_DATA_BYTES, "at most 65536 bytes"),
    ],
)
def test_bad_seed_input_is_a_400_naming_the_field(
    api: Any, node: Any, image: Any, field: str, value: Any, message: str
) -> None:
    response = api.post("/api/v1/vms/", vm_payload(**{field: value}), format="json")
    assert response.status_code == 400, response.json()
    errors = response.json()["error"]["fields"][field]
    assert message in json.dumps(errors), errors
    assert not VM.objects.exists()


def test_a_batch_names_the_item_whose_seed_is_bad(api: Any, node: Any, image: Any, ssh_key: str) -> None:
    payload = {"vms": [vm_payload(name="a", ssh_keys=[ssh_key]), vm_payload(name="b", hostname="no_pe")]}
    response = api.post("/api/v1/vms/batch/", payload, format="json")
    assert response.status_code == 400, response.json()
    assert "RFC 1123" in json.dumps(response.json()["error"]["fields"])
    assert not VM.objects.exists()
    payload = {"vms": [vm_payload(name="a", ssh_keys=[ssh_key]), vm_payload(name="b", hostname="web-b")]}
    response = api.post("/api/v1/vms/batch/", payload, format="json")
    assert response.status_code == 202, response.json()
    assert sorted(VM.objects.values_list("hostname", flat=True)) == ["a", "web-b"]


def test_a_project_boots_only_ready_images_it_may_see_and_meets_their_minimums(
    api: Any, other_user: Any, node: Any, make_image: Any
) -> None:
    other = personal_project(other_user)
    make_image("theirs", visibility="private", project=other, path="", sha256="a" * 64)
    make_image("uploading", status="uploading", path="", sha256="")
    make_image("big", min_memory_mb=4096, min_disk_gb=20)
    expectations = {
        "theirs": "No image named or numbered 'theirs'.",
        "uploading": "Image uploading is uploading, not ready: its file must be imported first.",
        "big": "Image big needs at least 4096 MiB of memory.",
    }
    for name, message in expectations.items():
        response = api.post("/api/v1/vms/", vm_payload(image=name), format="json")
        assert response.status_code == 400, response.json()
        assert response.json()["error"]["fields"]["image"] == [message]
    response = api.post("/api/v1/vms/", vm_payload(image="big", memory_mb=4096, disk_gb=10), format="json")
    assert response.json()["error"]["fields"]["image"] == ["Image big needs a disk of at least 20 GiB."]
    response = api.post("/api/v1/vms/", vm_payload(image="big", memory_mb=4096, disk_gb=20), format="json")
    assert response.status_code == 202, response.json()
    assert not VM.objects.exclude(image__name="big").exists()


@pytest.mark.parametrize(
    ("name", "expected"), [("web-1", "web-1"), ("db_1.x", "db-1-x"), ("_", "vm"), ("a" * 63, "a" * 63)]
)
def test_hostname_for_makes_a_valid_label_of_any_vm_name(name: str, expected: str) -> None:
    assert cloud_init.hostname_for(name) == expected
    cloud_init.check_hostname(expected)
