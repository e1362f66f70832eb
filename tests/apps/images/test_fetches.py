"""The fetch orchestration on the control side (real PostgreSQL and Redis; nodes answer by reports here).

What a node or the store would push is read off the queues: node tasks on ``node.<name>``, the store's
pushes on ``control``.
"""

import base64
import hashlib
import json
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from django.conf import settings
from django.db import close_old_connections
from django.utils import timezone

from apps.images import fetches
from apps.images.models import NodeImage, NodeImageState
from apps.migrations import services as migration_services
from apps.migrations.choices import MigrationMode, MigrationStatus
from apps.migrations.models import Migration
from apps.vms.choices import NodeStatus
from apps.vms.models import VM, Image, Node
from tests.conftest import vm_payload
from workers import contract

pytestmark = pytest.mark.django_db(transaction=True)

CONTENT = b"stored image bytes\n" * 1000
SHA256 = hashlib.sha256(CONTENT).hexdigest()


@pytest.fixture
def store(tmp_path: Path, settings) -> Path:
    settings.NOVACRON = {**settings.NOVACRON, "IMAGE_STORE_DIR": str(tmp_path / "store")}
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / SHA256).write_bytes(CONTENT)
    return tmp_path / "store"


@pytest.fixture
def stored(make_image: Any) -> Image:
    image: Image = make_image("debian-12", path="", sha256=SHA256, size_bytes=len(CONTENT))
    return image


@pytest.fixture
def nodes(make_node: Any) -> dict[str, Node]:
    return {name: make_node(name, dwcp_address=f"{name}:7400") for name in ("n1", "n2", "n3")}


@pytest.fixture(autouse=True)
def clean_queues() -> None:
    _client().delete("control", *(contract.node_queue(name) for name in ("n1", "n2", "n3")))


def _client() -> redis.Redis:
    return redis.Redis.from_url(settings.REDIS_URL)


def _tasks(queue: str) -> list[tuple[str, dict[str, Any]]]:
    """(task name, kwargs) of the messages waiting on ``queue``, oldest first."""
    found = []
    for raw in reversed(_client().lrange(queue, 0, -1)):
        message = json.loads(raw)
        body = json.loads(base64.b64decode(message["body"]))
        found.append((message["headers"]["task"], body[1]))
    return found


def _named(queue: str, task: str) -> list[dict[str, Any]]:
    return [kwargs for name, kwargs in _tasks(queue) if name == task]


def _create(api: Any, name: str, node: str) -> VM:
    response = api.post("/api/v1/vms/", vm_payload(name, image="debian-12", node=node), format="json")
    assert response.status_code == 202, response.content
    return VM.objects.get(pk=response.json()["id"])


def _report(row: NodeImage, event: contract.ImageFetchEvent, node: str, **extra: Any) -> None:
    fetches.fetch_report(fetch_id=str(row.fetch_id), node=node, sha256=SHA256, event=event, **extra)


def _row(node: str) -> NodeImage:
    return NodeImage.objects.select_related("node", "image").get(node__name=node)


def test_a_node_without_the_image_fetches_it_from_the_store_and_the_vm_waits(api, nodes, stored, store):
    vm = _create(api, "web-1", "n1")
    row = _row("n1")
    assert (row.state, row.source, row.tried) == (NodeImageState.FETCHING, "store", ["store"])
    (push,) = _named("control", "apps.images.fetch_tasks.store_send")
    assert push["target"] == f"images/incoming/{SHA256}" and push["dest_dwcp_address"] == "n1:7400"
    assert push["fetch_id"] == str(row.fetch_id)
    assert _named(contract.node_queue("n1"), contract.NODE_VM_CREATE) == []  # it waits
    vm.refresh_from_db()
    assert vm.state == "pending" and vm.state_reason == "fetching image debian-12 from store: 0 %"

    _report(row, "progress", "store", percent=43.5)
    vm.refresh_from_db()
    assert vm.state_reason == "fetching image debian-12 from store: 40 %"
    body = api.get(f"/api/v1/vms/{vm.pk}/").json()  # the cached representation followed
    assert body["state_reason"] == "fetching image debian-12 from store: 40 %"

    _report(row, "sent", "store")
    (adopt,) = _named(contract.node_queue("n1"), contract.NODE_IMAGE_ADOPT)
    assert adopt == {"fetch_id": str(row.fetch_id), "sha256": SHA256, "size_bytes": len(CONTENT)}
    _report(row, "adopted", "n1")
    assert _row("n1").state == NodeImageState.READY
    (create,) = _named(contract.node_queue("n1"), contract.NODE_VM_CREATE)
    assert create["vm"]["id"] == str(vm.pk) and create["vm"]["image"]["sha256"] == SHA256
    vm.refresh_from_db()
    assert vm.state_reason == ""


def test_a_peer_that_holds_the_image_is_preferred_to_the_store(api, nodes, stored, store):
    NodeImage.objects.create(node=nodes["n2"], image=stored, state=NodeImageState.READY, source="store")
    _create(api, "web-1", "n1")
    row = _row("n1")
    assert row.source == "n2"
    (push,) = _named(contract.node_queue("n2"), contract.NODE_IMAGE_SEND)
    assert push["dest_node"] == "n1" and push["sha256"] == SHA256
    assert _named("control", "apps.images.fetch_tasks.store_send") == []


def test_a_peer_that_is_down_is_not_a_source(api, nodes, stored, store):
    NodeImage.objects.create(node=nodes["n2"], image=stored, state=NodeImageState.READY)
    Node.objects.filter(name="n2").update(status=NodeStatus.DOWN)
    _create(api, "web-1", "n1")
    assert _row("n1").source == "store"


def test_a_node_that_holds_the_image_gets_the_create_at_once(api, nodes, stored, store):
    NodeImage.objects.create(node=nodes["n1"], image=stored, state=NodeImageState.READY)
    vm = _create(api, "web-1", "n1")
    (create,) = _named(contract.node_queue("n1"), contract.NODE_VM_CREATE)
    assert create["vm"]["id"] == str(vm.pk)
    assert _named("control", "apps.images.fetch_tasks.store_send") == []


def test_images_by_path_are_sent_as_before(api, nodes, make_image, store):
    make_image("legacy", path="/srv/images/legacy.qcow2")
    response = api.post("/api/v1/vms/", vm_payload(image="legacy", node="n1"), format="json")
    assert response.status_code == 202
    assert len(_named(contract.node_queue("n1"), contract.NODE_VM_CREATE)) == 1
    assert not NodeImage.objects.exists()


def test_concurrent_creates_on_one_node_make_one_fetch(api, nodes, stored, store, user):
    vms = [_create(api, f"web-{index}", "n1") for index in range(4)]
    NodeImage.objects.all().delete()  # as if none had been asked yet: the four race for it
    _client().delete("control")
    barrier = threading.Barrier(len(vms))
    errors: list[BaseException] = []

    def create(vm: VM) -> None:
        try:
            barrier.wait()
            fetches.send_creates([vm])
        except BaseException as exc:
            errors.append(exc)
        finally:
            close_old_connections()

    threads = [threading.Thread(target=create, args=(vm,)) for vm in vms]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert NodeImage.objects.count() == 1
    assert len(_named("control", "apps.images.fetch_tasks.store_send")) == 1
    row = _row("n1")
    _report(row, "sent", "store")
    _report(row, "adopted", "n1")
    creates = _named(contract.node_queue("n1"), contract.NODE_VM_CREATE)
    assert sorted(create["vm"]["id"] for create in creates) == sorted(str(vm.pk) for vm in vms)


def test_a_failed_push_retries_from_the_next_source_then_fails_the_waiting_vms(api, nodes, stored, store):
    NodeImage.objects.create(node=nodes["n2"], image=stored, state=NodeImageState.READY)
    vm = _create(api, "web-1", "n1")
    first = _row("n1")
    assert first.source == "n2"
    _report(first, "failed", "n2", detail="connection refused")
    second = _row("n1")
    assert (second.source, second.tried) == ("store", ["n2", "store"])
    assert second.fetch_id != first.fetch_id
    _report(first, "adopted", "n1")  # a report of the earlier fetch changes nothing
    assert _row("n1").state == NodeImageState.FETCHING
    _report(second, "failed", "n1", detail="image arrived with sha256 0000: discarded")
    failed = _row("n1")
    assert failed.state == NodeImageState.FAILED
    vm.refresh_from_db()
    assert vm.state == "error" and vm.node is None
    assert vm.state_reason == (
        "Create failed: image debian-12 could not be fetched to n1: "
        "n1: image arrived with sha256 0000: discarded"
    )
    assert Node.objects.get(name="n1").allocated_vcpus == 0  # the capacity went back


def test_an_image_nowhere_fails_the_create_with_a_clear_reason(api, nodes, stored, tmp_path, settings):
    settings.NOVACRON = {**settings.NOVACRON, "IMAGE_STORE_DIR": str(tmp_path / "empty")}
    vm = _create(api, "web-1", "n1")
    vm.refresh_from_db()
    assert vm.state == "error"
    assert vm.state_reason == (
        "Create failed: image debian-12 could not be fetched to n1: no node holds it and the store has no copy"
    )


def test_a_node_that_lost_the_image_fetches_it_again(api, nodes, stored, store):
    NodeImage.objects.create(node=nodes["n1"], image=stored, state=NodeImageState.READY)
    vm = _create(api, "web-1", "n1")
    fetches.fetch_report(fetch_id="", node="n1", sha256=SHA256, event="missing", vm_id=str(vm.pk))
    row = _row("n1")
    assert (row.state, row.source) == (NodeImageState.FETCHING, "store")
    vm.refresh_from_db()
    assert vm.state == "pending" and vm.state_reason.startswith("fetching image debian-12")


def test_the_rows_follow_a_nodes_listing(nodes, stored, make_image):
    other = make_image("alpine", path="", sha256="b" * 64, size_bytes=10)
    failed = make_image("arch", path="", sha256="c" * 64, size_bytes=10)
    NodeImage.objects.create(node=nodes["n1"], image=stored, state=NodeImageState.READY)
    NodeImage.objects.create(node=nodes["n1"], image=failed, state=NodeImageState.FAILED, reason="x")
    listing: list[contract.CachedImage] = [
        {"sha256": sha256, "size_bytes": 10, "last_used": 0.0, "in_use": False}
        for sha256 in ("b" * 64, "c" * 64)
    ]
    fetches.node_images(node="n1", images=listing, over_limit="")
    assert set(NodeImage.objects.filter(node__name="n1").values_list("image", "state", "reason")) == {
        (other.pk, NodeImageState.READY, ""),
        (failed.pk, NodeImageState.READY, ""),
    }


def _started_migration(
    api: Any, user: Any, nodes: dict[str, Node], stored: Image, mode: MigrationMode
) -> Migration:
    """A running VM of ``stored`` on n1 (which holds the image), migrating to n3 (which does not)."""
    NodeImage.objects.create(node=nodes["n1"], image=stored, state=NodeImageState.READY)
    vm = _create(api, "web-1", "n1")
    VM.objects.filter(pk=vm.pk).update(state="running")
    migration = migration_services.migration_request(
        vm=vm, requested_by=user, mode=mode, dest_node=nodes["n3"]
    )
    migration_services.migrations_schedule()
    migration.refresh_from_db()
    return migration


def test_a_migration_waits_in_phase_image_then_prepares(api, nodes, stored, store, user):
    migration = _started_migration(api, user, nodes, stored, MigrationMode.LIVE)
    assert (migration.status, migration.phase) == (MigrationStatus.PREPARING, "image")
    assert _named(contract.node_queue("n3"), contract.NODE_MIGRATION_PREPARE) == []
    row = _row("n3")
    assert row.source == "n1"  # the VM's own node holds it
    _report(row, "sent", "n1")
    _report(row, "adopted", "n3")
    migration.refresh_from_db()
    assert (migration.status, migration.phase) == (MigrationStatus.PREPARING, "")
    assert len(_named(contract.node_queue("n3"), contract.NODE_MIGRATION_PREPARE)) == 1


def test_a_failed_base_fetch_fails_the_migration_and_the_vm_keeps_running(api, nodes, stored, store, user):
    migration = _started_migration(api, user, nodes, stored, MigrationMode.COLD)
    vm = migration.vm
    _report(_row("n3"), "failed", "n1", detail="disk full")
    _report(_row("n3"), "failed", "store", detail="disk full")
    migration.refresh_from_db()
    assert migration.status == MigrationStatus.FAILED
    assert migration.error == "image debian-12 could not be fetched to n3: store: disk full"
    vm.refresh_from_db()
    assert (vm.state, vm.node_id) == ("running", nodes["n1"].pk)
    assert Node.objects.get(name="n3").allocated_vcpus == 0
    assert _named(contract.node_queue("n3"), contract.NODE_MIGRATION_PREPARE) == []


def test_a_stalled_fetch_restarts_from_the_next_source_then_fails(api, nodes, stored, store):
    NodeImage.objects.create(node=nodes["n2"], image=stored, state=NodeImageState.READY)
    vm = _create(api, "web-1", "n1")
    assert _row("n1").source == "n2"
    assert fetches.fetches_watchdog() == []  # a fresh fetch is left alone
    long_ago = timezone.now() - timedelta(hours=1)
    NodeImage.objects.filter(node__name="n1").update(updated_at=long_ago)
    fetches.fetches_watchdog()
    row = _row("n1")
    assert (row.state, row.source, row.tried) == (NodeImageState.FETCHING, "store", ["n2", "store"])
    _report(row, "progress", "store", percent=12.0)  # a report keeps it alive
    assert fetches.fetches_watchdog() == []
    NodeImage.objects.filter(node__name="n1").update(updated_at=long_ago)
    fetches.fetches_watchdog()
    vm.refresh_from_db()
    assert vm.state == "error"
    assert vm.state_reason.endswith("could not be fetched to n1: store: no report for 120 s")
