"""Stored images reach nodes by DWCP, once per node, from the store or a peer; a live migration brings
the base to its destination first; a small cache evicts the least recently used image no VM uses; a
push whose link is cut for a while resumes and completes in the same attempt.

Real processes throughout: a control worker (it pushes from the store), three node workers in their
own network namespaces, QEMU under TCG. The images are not bootable: SeaBIOS runs, which is a running
VM for these purposes. Transfers are counted in the receivers' logs, where DWCP's server writes one
"verified" line per completed file transfer.
"""

import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from apps.images.models import NodeImage, NodeImageState
from apps.images.store import store_path
from apps.migrations.models import Migration, MigrationEvent
from apps.projects.models import Project
from apps.vms.models import VM, Image
from bench.migration.netns import drop_peer, undrop_peer
from tests.netlab import NetLab
from tests.workers.node.conftest import Cluster, wait_for
from workers import contract
from workers.node.images import qcow2_backing_file

pytestmark = [
    pytest.mark.integration,
    pytest.mark.qemu,
    pytest.mark.netns,
    pytest.mark.django_db(transaction=True),
]


def _vm(name: str, image: Image, node: str) -> dict[str, Any]:
    return {
        "name": name,
        "image": image.name,
        "vcpus": 1,
        "memory_mb": 64,
        "disk_gb": 1,
        "node": node,
        "networks": [],
    }


def _transfers(cluster: Cluster, node: str, image: Image) -> int:
    """Completed DWCP transfers of ``image`` into ``node``'s incoming directory."""
    target = f"{contract.IMAGE_INCOMING_DIR}/{image.sha256}"
    log = (cluster.workdir / f"{node}.log").read_text(errors="replace")
    return len(re.findall(rf"DWCP transfer \S+: {re.escape(target)} verified", log))


def _running(*names: str) -> bool:
    return VM.objects.filter(name__in=names, state="running").count() == len(names)


def _cached(cluster: Cluster, node: str) -> set[str]:
    return {
        path.name for path in (cluster.data_dirs[node] / contract.IMAGE_CACHE_DIR).iterdir() if path.is_file()
    }


def _ended(migration_id: str) -> Migration:
    wait_for(
        lambda: Migration.objects.filter(pk=migration_id, status__in=["completed", "failed"]).exists(),
        300,
        "the migration to end",
        interval=1,
    )
    return Migration.objects.get(pk=migration_id)


def _source(node: str, image: Image) -> str:
    row = NodeImage.objects.get(node__name=node, image=image)
    assert row.state == NodeImageState.READY
    return row.source


def test_images_travel_once_per_node_migrations_bring_the_base_and_the_cache_evicts(
    cluster: Cluster, api, user, make_stored_image
):
    Project.objects.filter(personal_of=user).update(max_vms=20, max_vcpus=20, max_memory_mb=20 * 64)
    n1, n2, n3 = cluster.nodes
    debian, other, third = (make_stored_image(name) for name in ("debian-12", "other", "third"))

    # A first VM: its node fetches the image from the store, as its state reason tells meanwhile.
    response = api.post("/api/v1/vms/", _vm("a1", debian, n1), format="json")
    assert response.status_code == 202, response.json()
    assert response.json()["state_reason"].startswith("fetching image debian-12 from store")
    wait_for(lambda: _running("a1"), 180, "a1 to run", interval=1)
    assert _source(n1, debian) == contract.IMAGE_STORE_SOURCE
    a1 = VM.objects.get(name="a1")
    assert a1.state_reason == ""

    # A batch on the second node: one fetch, from the peer that holds it, and all four start.
    batch = [_vm(f"b{index}", debian, n2) for index in range(4)]
    response = api.post("/api/v1/vms/batch/", {"vms": batch}, format="json")
    assert response.status_code == 202, response.json()
    wait_for(lambda: _running("b0", "b1", "b2", "b3"), 300, "the batch to run", interval=1)
    assert _source(n2, debian) == n1
    assert (_transfers(cluster, n1, debian), _transfers(cluster, n2, debian)) == (1, 1)

    # A VM of another image on the first node, older in the cache than debian-12 will be.
    response = api.post("/api/v1/vms/", _vm("o1", other, n1), format="json")
    assert response.status_code == 202, response.json()
    wait_for(lambda: _running("o1"), 180, "o1 to run", interval=1)

    # A live migration to the third node, which lacks the base: it fetches it first, visibly.
    response = api.post(f"/api/v1/vms/{a1.pk}/migrate/", {"dest_node": n3, "mode": "live"}, format="json")
    assert response.status_code in (201, 202), response.json()
    migration = _ended(response.json()["id"])
    assert migration.status == "completed", migration.error
    phases = list(MigrationEvent.objects.filter(migration=migration).values_list("phase", "detail"))
    assert ("image", "phase image") in phases
    assert any(detail.startswith(f"{n3} holds image debian-12") for _, detail in phases)
    assert _source(n3, debian) in (n1, n2)  # a peer, never the store
    assert _transfers(cluster, n3, debian) == 1
    a1.refresh_from_db()
    assert (a1.state, a1.node.name) == ("running", n3)
    wait_for(lambda: not (cluster.data_dirs[n1] / "run" / str(a1.pk)).exists(), 60, "the source copy to go")
    assert qcow2_backing_file(cluster.data_dirs[n3] / "disks" / f"{a1.pk}.qcow2") == str(
        cluster.data_dirs[n3] / contract.IMAGE_CACHE_DIR / debian.sha256
    )  # the destination made its disk on its own cache file

    # The first node's cache holds two images: a third evicts the least recently used image no VM
    # uses (debian-12, since a1 left), never "other", older but in use by o1.
    assert _cached(cluster, n1) == {debian.sha256, other.sha256}
    response = api.post("/api/v1/vms/", _vm("t1", third, n1), format="json")
    assert response.status_code == 202, response.json()
    wait_for(lambda: _running("t1"), 180, "t1 to run", interval=1)
    wait_for(lambda: _cached(cluster, n1) == {other.sha256, third.sha256}, 30, "the eviction")
    wait_for(
        lambda: not NodeImage.objects.filter(node__name=n1, image=debian).exists(),
        30,
        "the evicted image's row to go",
    )
    assert set(NodeImage.objects.filter(node__name=n1).values_list("image__name", "state")) == {
        ("other", "ready"),
        ("third", "ready"),
    }
    assert _running("o1", "b0", "b1", "b2", "b3", "a1", "t1")

    # A cold migration to a node without the base: fetched first, then the received overlay is rebased
    # onto the destination's own cache file before it starts.
    t1 = VM.objects.get(name="t1")
    response = api.post(f"/api/v1/vms/{t1.pk}/migrate/", {"dest_node": n2, "mode": "cold"}, format="json")
    assert response.status_code in (201, 202), response.json()
    cold = _ended(response.json()["id"])
    assert cold.status == "completed", cold.error
    assert MigrationEvent.objects.filter(migration=cold, phase="image").exists()
    assert _source(n2, third) == n1
    t1.refresh_from_db()
    assert (t1.state, t1.node.name) == ("running", n2)
    disk = cluster.data_dirs[n2] / "disks" / f"{t1.pk}.qcow2"
    assert qcow2_backing_file(disk) == str(cluster.data_dirs[n2] / contract.IMAGE_CACHE_DIR / third.sha256)
    compare = subprocess.run(
        ["qemu-img", "compare", "-U", str(disk), str(store_path(third.sha256))],
        capture_output=True,
        text=True,
    )
    assert compare.returncode == 0, compare.stdout + compare.stderr  # the chain reads the base's bytes

    # A node that lost an image it was thought to hold (a wiped disk) says so at the create: the image
    # is fetched again, from a peer, and the VM runs.
    (cluster.data_dirs[n1] / contract.IMAGE_CACHE_DIR / third.sha256).unlink()
    assert _source(n1, third) == contract.IMAGE_STORE_SOURCE  # the control plane still thinks it is there
    response = api.post("/api/v1/vms/", _vm("w1", third, n1), format="json")
    assert response.status_code == 202, response.json()
    wait_for(lambda: _running("w1"), 180, "w1 to run", interval=1)
    assert _source(n1, third) == n2
    assert _transfers(cluster, n1, third) == 2


def test_a_path_image_vm_runs_as_before(cluster: Cluster, api, guest_image: Image, tmp_path: Path):
    n1 = next(iter(cluster.nodes))
    response = api.post(
        "/api/v1/vms/",
        {
            "name": "k1",
            "image": guest_image.name,
            "vcpus": 1,
            "memory_mb": 96,
            "disk_gb": 1,
            "node": n1,
            "networks": [],
        },
        format="json",
    )
    assert response.status_code == 202, response.json()
    wait_for(lambda: _running("k1"), 180, "k1 to run", interval=1)
    assert not NodeImage.objects.exists()


def test_an_image_push_across_a_cut_link_completes_in_the_same_attempt(
    cluster: Cluster, lab: NetLab, api, make_stored_image
):
    n1, n2, _ = cluster.nodes
    debian = make_stored_image("debian-12")
    response = api.post("/api/v1/vms/", _vm("a1", debian, n1), format="json")
    assert response.status_code == 202, response.json()
    wait_for(lambda: _running("a1"), 180, "a1 to run", interval=1)
    # The peer's pushes now take seconds (8.4 MB at 8 Mbit/s): cut the link between the two nodes for
    # 10 s once the push to the second node has begun.
    lab.hosts[0].run("tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", "8mbit", "burst", "64kb",
                     "latency", "50ms")  # fmt: skip
    response = api.post("/api/v1/vms/", _vm("b1", debian, n2), format="json")
    assert response.status_code == 202, response.json()
    part = cluster.data_dirs[n2] / contract.IMAGE_INCOMING_DIR / f".{debian.sha256}.dwcp-part"
    wait_for(part.exists, 120, "the push to begin", interval=0.05)
    time.sleep(1)
    drop_peer(lab.hosts[0].netns, lab.hosts[1].address)
    try:
        time.sleep(10)
    finally:
        undrop_peer(lab.hosts[0].netns)
    wait_for(lambda: _running("b1"), 180, "b1 to run", interval=1)
    # The same push, from the same peer, completed: no other source was tried, one transfer arrived.
    assert _source(n2, debian) == n1
    assert _transfers(cluster, n2, debian) == 1
    log = (cluster.workdir / f"{n2}.log").read_text(errors="replace")
    assert re.search(r"DWCP transfer \S+ resumed \(generation \d+\)", log), "the cut missed the push"
