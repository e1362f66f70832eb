"""The invariant every fault scenario checks, and small helpers shared by the scenarios.

Whatever failed: every VM runs (or is stopped with its disk intact) on exactly one node, each
node's allocated capacity equals the sum of its VMs, and every migration ended in a terminal state,
a failed one with an error that says why.
"""

import hashlib
import os
import subprocess
from pathlib import Path
from typing import Any

from apps.migrations.models import Migration
from apps.vms.models import VM, Node
from tests.workers.node.conftest import Cluster, wait_for

FAULT_STALL_TIMEOUT = 30
TERMINAL = ("completed", "failed", "cancelled")


def dirty_guest_with_marker(cluster: Cluster, api: Any, name: str, node: str, image: str, marker: str) -> str:
    """A running memory-dirtying guest on ``node`` that has written ``marker`` to its disk."""
    from workers.guest.boot import GuestChannel

    vm_id = create_running(api, name, node, image)
    channel = GuestChannel.connect(run_dir(cluster, node, vm_id) / "guest.sock", timeout=30)
    try:
        channel.wait_for(r"dirty ready", 120)
        channel.request("disk-write", marker, timeout=60)
    finally:
        channel.close()
    return vm_id


def disk_marker(cluster: Cluster, node: str, vm_id: str) -> list[str]:
    """What the guest on ``node`` reads back from its disk marker."""
    from workers.guest.boot import GuestChannel

    channel = GuestChannel.connect(run_dir(cluster, node, vm_id) / "guest.sock", timeout=30)
    try:
        return list(channel.request("disk-read", timeout=60))
    finally:
        channel.close()


def create_vm(api: Any, name: str, node: str, image: str = "testguest") -> str:
    """POST a VM pinned to ``node``; its id, without waiting for the node to create it."""
    payload = {"name": name, "image": image, "vcpus": 1, "memory_mb": 128, "disk_gb": 1, "node": node}
    response = api.post("/api/v1/vms/", payload, format="json")
    assert response.status_code == 202, response.json()
    return str(response.json()["id"])


def create_running(api: Any, name: str, node: str, image: str = "testguest", timeout: float = 90) -> str:
    vm_id = create_vm(api, name, node, image)
    wait_for(lambda: VM.objects.get(pk=vm_id).state == "running", timeout, f"{name} to run")
    return vm_id


def run_dir(cluster: Cluster, node: str, vm_id: str) -> Path:
    return cluster.data_dirs[node] / "run" / vm_id


def disk_path(cluster: Cluster, node: str, vm_id: str) -> Path:
    return cluster.data_dirs[node] / "disks" / f"{vm_id}.qcow2"


def qemu_pid(cluster: Cluster, node: str, vm_id: str) -> int | None:
    try:
        pid = int((run_dir(cluster, node, vm_id) / "qemu.pid").read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def holders(cluster: Cluster, vm_id: str) -> list[str]:
    """The nodes holding any copy of the VM: its definition, its disk or a QEMU."""
    return sorted(
        name
        for name in cluster.data_dirs
        if (run_dir(cluster, name, vm_id) / "spec.json").exists()
        or disk_path(cluster, name, vm_id).exists()
        or qemu_pid(cluster, name, vm_id) is not None
    )


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _tcp_connections(*selection: str) -> set[frozenset[str]]:
    """The TCP connections ``ss`` lists for ``selection``, each as the set of its two endpoints (so
    the two sockets of a loopback connection are one connection)."""
    listing = subprocess.run(["ss", "-Htn", *selection], capture_output=True, text=True, check=True)
    return {frozenset(line.split()[-2:]) for line in listing.stdout.splitlines() if line.strip()}


def cut_connections(port: int) -> int:
    """Destroy every established TCP connection to or from ``port`` (``ss -K``); how many are gone.

    Counted from the kernel's socket table, not from what ``ss -K`` printed: a connection counts when
    it was established before the cut and no socket of it exists afterwards, in any state. One closed
    the ordinary way in between lingers in FIN_WAIT/TIME_WAIT and does not count, and a kernel
    without socket destruction (``CONFIG_INET_DIAG_DESTROY``) destroys nothing, so the count is 0.
    """
    selector = f"( dport = :{port} or sport = :{port} )"
    before = _tcp_connections("state", "established", selector)
    subprocess.run(["ss", "-K", "-Htn", "state", "established", selector], capture_output=True, check=True)
    return len(before - _tcp_connections("state", "all", selector))


def wait_terminal(migration_id: str, timeout: float) -> Migration:
    wait_for(
        lambda: Migration.objects.get(pk=migration_id).status in TERMINAL, timeout, "the migration to end"
    )
    return Migration.objects.get(pk=migration_id)


def _copies_settled(cluster: Cluster) -> list[str]:
    problems = []
    for vm in VM.objects.exclude(state="deleted").select_related("node"):
        vm_id = str(vm.pk)
        found = holders(cluster, vm_id)
        if vm.node is None:
            if found:
                problems.append(f"VM {vm.name} is on no node but {found} hold a copy")
            continue
        if found != [vm.node.name]:
            problems.append(f"VM {vm.name} is recorded on {vm.node.name} but held by {found}")
            continue
        running = qemu_pid(cluster, vm.node.name, vm_id) is not None
        if vm.state == "running" and not running:
            problems.append(f"VM {vm.name} is recorded running but no QEMU runs on {vm.node.name}")
        if vm.state == "stopped" and not disk_path(cluster, vm.node.name, vm_id).exists():
            problems.append(f"VM {vm.name} is stopped without its disk on {vm.node.name}")
        if vm.state not in ("running", "stopped"):
            problems.append(f"VM {vm.name} is {vm.state} ({vm.state_reason})")
    return problems


def _capacity_problems() -> list[str]:
    problems = []
    for node in Node.objects.all():
        vms = VM.objects.filter(node=node).exclude(state="deleted")
        expected = (
            sum(vm.vcpus for vm in vms),
            sum(vm.memory_mb for vm in vms),
            sum(vm.disk_gb for vm in vms),
        )
        actual = (node.allocated_vcpus, node.allocated_memory_mb, node.allocated_disk_gb)
        if actual != expected:
            problems.append(f"node {node.name}: allocated {actual}, its VMs need {expected}")
    return problems


def assert_invariant(cluster: Cluster, timeout: float = 45) -> None:
    """Wait (bounded) until the fleet satisfies the invariant, then assert it."""
    wait_for(
        lambda: not Migration.objects.exclude(status__in=TERMINAL).exists(),
        timeout,
        "every migration to reach a terminal state",
    )
    for migration in Migration.objects.filter(status="failed"):
        assert migration.error.strip(), f"migration {migration.pk} failed without an error"
    last: list[str] = []

    def settled() -> bool:
        nonlocal last
        last = _copies_settled(cluster) + _capacity_problems()
        return not last

    try:
        wait_for(settled, timeout, "the fleet to settle", interval=0.5)
    except AssertionError:
        raise AssertionError("invariant violated: " + "; ".join(last)) from None
