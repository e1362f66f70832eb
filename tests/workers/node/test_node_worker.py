"""Node workers as real processes: a VM created through the API is a real QEMU guest on a node.

Control worker + two node workers + the test guest under TCG; no mocks of QEMU, Celery, Redis or
PostgreSQL.
"""

import itertools
import os
import signal
import time
from pathlib import Path

import pytest

from apps.vms.models import VM, BatchOperation, Node
from tests.workers.node.conftest import Cluster, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.qemu, pytest.mark.django_db(transaction=True)]


def _vm(vm_id: str) -> VM:
    return VM.objects.select_related("node").get(pk=vm_id)


def _state(vm_id: str) -> str:
    return VM.objects.values_list("state", flat=True).get(pk=vm_id)


def _guest_log(cluster: Cluster, vm: VM) -> str:
    assert vm.node is not None
    log = cluster.data_dirs[vm.node.name] / "run" / str(vm.pk) / "guest.log"
    return log.read_text(errors="replace") if log.exists() else ""


def _ticks(cluster: Cluster, vm: VM) -> list[int]:
    return [int(line.split()[1]) for line in _guest_log(cluster, vm).splitlines() if line.startswith("tick ")]


def _qemu_pid(cluster: Cluster, vm: VM) -> int | None:
    assert vm.node is not None
    pidfile = cluster.data_dirs[vm.node.name] / "run" / str(vm.pk) / "qemu.pid"
    try:
        pid = int(pidfile.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def _allocated(name: str) -> tuple[int, int, int]:
    node = Node.objects.get(name=name)
    return node.allocated_vcpus, node.allocated_memory_mb, node.allocated_disk_gb


def _create(api, name: str, node: str | None = None) -> str:
    payload = {"name": name, "image": "testguest", "vcpus": 1, "memory_mb": 128, "disk_gb": 1}
    if node:
        payload["node"] = node
    response = api.post("/api/v1/vms/", payload, format="json")
    assert response.status_code == 202, response.json()
    return response.json()["id"]


def test_vm_lifecycle_through_the_api(cluster: Cluster, api):
    node_name = next(iter(cluster.nodes))
    vm_id = _create(api, "life", node_name)
    wait_for(lambda: _state(vm_id) == "running", 60, "the VM to run")
    vm = _vm(vm_id)
    wait_for(lambda: len(_ticks(cluster, vm)) >= 3, 60, "ticks on the guest channel")
    pid = _qemu_pid(cluster, vm)
    assert pid is not None

    assert api.post(f"/api/v1/vms/{vm_id}/stop/").status_code == 202
    wait_for(lambda: _state(vm_id) == "stopped", 60, "the VM to stop")
    assert _qemu_pid(cluster, vm) is None
    assert _vm(vm_id).pending_action == ""

    assert api.post(f"/api/v1/vms/{vm_id}/start/").status_code == 202
    wait_for(lambda: _state(vm_id) == "running" and _vm(vm_id).pending_action == "", 60, "the VM to start")
    wait_for(lambda: len(_ticks(cluster, vm)) >= 3, 60, "ticks after start")

    wait_for(lambda: max(_ticks(cluster, vm), default=0) >= 20, 60, "the counter to pass 20")
    assert api.post(f"/api/v1/vms/{vm_id}/reboot/").status_code == 202
    wait_for(lambda: _vm(vm_id).pending_action == "", 30, "the reboot to be reported")

    def restarted() -> bool:
        ticks = _ticks(cluster, vm)
        return any(later < earlier for earlier, later in itertools.pairwise(ticks))

    wait_for(restarted, 60, "the tick counter to restart after the reboot")

    before = _allocated(node_name)
    assert before == (1, 128, 1)
    assert api.delete(f"/api/v1/vms/{vm_id}/").status_code == 202
    wait_for(lambda: _state(vm_id) == "deleted", 60, "the VM to be deleted")
    data_dir = cluster.data_dirs[node_name]
    assert not (data_dir / "run" / vm_id).exists()
    assert not (data_dir / "disks" / f"{vm_id}.qcow2").exists()
    assert _allocated(node_name) == (0, 0, 0)


def test_batch_of_20_across_both_nodes(cluster: Cluster, api):
    items = [
        {"name": f"b{i}", "image": "testguest", "vcpus": 1, "memory_mb": 96, "disk_gb": 1} for i in range(20)
    ]
    body = api.post("/api/v1/vms/batch/", {"vms": items}, format="json").json()
    batch_id = body["batch"]["id"]
    assert {vm["node"] for vm in body["vms"]} == set(cluster.nodes)
    seen_counts = []

    def finished() -> bool:
        detail = api.get(f"/api/v1/batches/{batch_id}/").json()
        seen_counts.append(detail["counts"])
        return detail["status"] != "running"

    wait_for(finished, 180, "the batch to finish", interval=1)
    detail = api.get(f"/api/v1/batches/{batch_id}/").json()
    assert detail["status"] == "completed", detail
    assert detail["counts"] == {"pending": 0, "succeeded": 20, "failed": 0}
    assert all(item["status"] == "succeeded" for item in detail["items"])
    assert VM.objects.filter(state="running").count() == 20
    assert BatchOperation.objects.get(pk=batch_id).finished_at is not None
    ids = [vm["id"] for vm in body["vms"]]
    deletion = api.delete("/api/v1/vms/batch/", {"ids": ids}, format="json").json()
    wait_for(
        lambda: api.get(f"/api/v1/batches/{deletion['batch']['id']}/").json()["status"] == "completed",
        120,
        "the batch delete",
        interval=1,
    )
    for name in cluster.nodes:
        assert _allocated(name) == (0, 0, 0)
        assert list((cluster.data_dirs[name] / "disks").glob("*.qcow2")) == []


def test_killed_qemu_is_reported_within_15_seconds(cluster: Cluster, api):
    vm_id = _create(api, "victim")
    wait_for(lambda: _state(vm_id) == "running", 60, "the VM to run")
    vm = _vm(vm_id)
    pid = _qemu_pid(cluster, vm)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    wait_for(lambda: _state(vm_id) in ("stopped", "error"), 15, "the dead QEMU to be reported")
    print(f"dead QEMU reported after {time.monotonic() - killed_at:.1f} s: {_vm(vm_id).state_reason}")
    assert _vm(vm_id).state_reason


def test_node_worker_killed_during_create_ends_running_or_error_never_duplicated(cluster: Cluster, api):
    node_name = next(iter(cluster.nodes))
    node = cluster.nodes[node_name]
    vm_id = _create(api, "survivor", node_name)
    run_dir = cluster.data_dirs[node_name] / "run" / vm_id
    wait_for(lambda: run_dir.exists() or _state(vm_id) != "pending", 30, "the node to start creating")
    node.kill()
    node.start()
    wait_for(lambda: _state(vm_id) in ("running", "error"), 90, "the VM to settle after the restart")
    time.sleep(3)  # a redelivered or re-sent create must not start a second QEMU
    pids = [
        int(path.read_text().strip())
        for path in Path(cluster.data_dirs[node_name], "run").glob("*/qemu.pid")
        if path.read_text().strip()
    ]
    assert len(pids) <= 1
    state = _state(vm_id)
    if state == "running":
        assert _allocated(node_name) == (1, 128, 1)
    else:
        assert _allocated(node_name) == (0, 0, 0)
        assert list(Path(cluster.data_dirs[node_name], "disks").glob("*.qcow2")) == []
