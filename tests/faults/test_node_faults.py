"""Node-side faults: a node worker killed mid-work, the DWCP connection cut, the destination disk full.

The worker is killed with SIGKILL (its process group; the daemonized QEMUs live on, as in production)
and started again, as a supervisor would. Each scenario ends with the fleet invariant.
"""

import subprocess
import time
from pathlib import Path

import pytest

from apps.migrations.models import Migration
from apps.vms.models import VM, Image, Node
from tests.faults.conftest import FaultRecord
from tests.faults.invariants import (
    assert_invariant,
    create_running,
    create_vm,
    cut_connections,
    dirty_guest_with_marker,
    disk_marker,
    disk_path,
    holders,
    qemu_pid,
    run_dir,
    sha256,
    wait_terminal,
)
from tests.workers.node import test_migration
from tests.workers.node.conftest import Cluster, wait_for

pytestmark = [
    pytest.mark.faults,
    pytest.mark.integration,
    pytest.mark.qemu,
    pytest.mark.django_db(transaction=True),
]

DATA_MB = 24


@pytest.fixture
def dirty_image(guest_image: Image) -> Image:
    return test_migration.dirty_image.__wrapped__(guest_image)  # type: ignore[attr-defined]


def _stopped_with_data(cluster: Cluster, api, name: str, node: str, tmp_path: Path) -> tuple[str, str]:
    """A stopped VM whose disk holds DATA_MB of random bytes; returns its id and the disk's sha256."""
    vm_id = create_running(api, name, node)
    assert api.post(f"/api/v1/vms/{vm_id}/stop/").status_code == 202
    wait_for(
        lambda: VM.objects.get(pk=vm_id).state == "stopped" and not VM.objects.get(pk=vm_id).pending_action,
        60,
        "the VM to stop",
    )
    noise = tmp_path / "noise.bin"
    with noise.open("wb") as handle:
        handle.write(__import__("os").urandom(DATA_MB << 20))
    disk = disk_path(cluster, node, vm_id)
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -s {noise} 0 {DATA_MB}M", str(disk)],
        check=True,
        capture_output=True,
    )
    return vm_id, sha256(disk)


def _migrate(api, vm_id: str, dest: str, mode: str, mbps: int | None) -> str:
    body: dict[str, str | int] = {"dest_node": dest, "mode": mode}
    if mbps:
        body["bandwidth_limit_mbps"] = mbps
    response = api.post(f"/api/v1/vms/{vm_id}/migrate/", body, format="json")
    assert response.status_code == 202, response.json()
    return str(response.json()["id"])


def _transferring(api, vm_id: str, dest: str, mode: str, mbps: int, settle: float) -> str:
    """Start a migration of ``vm_id`` to ``dest`` and return its id ``settle`` seconds into its transfer."""
    migration_id = _migrate(api, vm_id, dest, mode, mbps)
    wait_for(lambda: Migration.objects.get(pk=migration_id).status == "transferring", 60, "transferring")
    time.sleep(settle)
    return migration_id


def _dwcp_port(node: str) -> int:
    return int(Node.objects.get(name=node).dwcp_address.rsplit(":", 1)[1])


def _cut_dwcp(fault: FaultRecord, node: str) -> None:
    """Cut every connection to ``node``'s DWCP port; the cut must have destroyed at least one."""
    destroyed = cut_connections(_dwcp_port(node))
    fault.injected()
    fault.note(f"ss -K destroyed {destroyed} DWCP connection(s) (counted in the kernel's socket table)")
    assert destroyed >= 1, "the cut destroyed no DWCP connection: the transfer ran on untouched"


def _failed_back_on_source(
    cluster: Cluster, fault: FaultRecord, migration: Migration, vm_id: str, source: str
) -> None:
    """A live migration hit by a killed worker failed, and the fleet settled with the VM on its source:
    running there only, not paused (its guest channel's log grows), its disk marker intact."""
    assert_invariant(cluster, timeout=60)
    fault.recovered()
    fault.note(f"migration ended {migration.status}: {migration.error}")
    assert migration.status == "failed" and migration.error
    vm = VM.objects.select_related("node").get(pk=vm_id)
    assert vm.node.name == source and vm.state == "running"
    log = run_dir(cluster, source, vm_id) / "guest.log"
    size = log.stat().st_size
    wait_for(lambda: log.stat().st_size > size, 15, "the source guest to keep running (not paused)")
    assert disk_marker(cluster, source, vm_id) == ["before-the-fault"]


def test_node_worker_killed_during_create(cluster: Cluster, api, fault: FaultRecord):
    fault.describe(
        scenario="kill -9 of the node worker while it creates a VM",
        action="POST /vms/ pinned to a node; SIGKILL its worker once the run dir appears; restart it",
        invariant="the VM ends running or error, never two QEMUs; capacity held only when running; fleet invariant",
    )
    node = next(iter(cluster.nodes))
    vm_id = create_vm(api, "survivor", node)
    wait_for(
        lambda: run_dir(cluster, node, vm_id).exists() or VM.objects.get(pk=vm_id).state != "pending",
        30,
        "the node to start creating",
    )
    cluster.nodes[node].kill()
    fault.injected()
    fault.note(f"the VM was {VM.objects.get(pk=vm_id).state} when its worker was killed")
    cluster.start_node(node)
    wait_for(lambda: VM.objects.get(pk=vm_id).state in ("running", "error"), 90, "the VM to settle")
    vm = VM.objects.get(pk=vm_id)
    fault.note(f"the VM ended {vm.state}{f' ({vm.state_reason})' if vm.state_reason else ''}")
    if vm.state == "error":  # nothing of it left to run: the operator would delete it
        assert vm.node is None, f"an errored create still holds {vm.node}"
        VM.objects.filter(pk=vm_id).update(state="deleted")
    assert_invariant(cluster)
    fault.recovered()
    time.sleep(3)  # a redelivered or re-sent create must not start a second QEMU
    pids = [path.read_text().strip() for path in (cluster.data_dirs[node] / "run").glob("*/qemu.pid")]
    assert len([pid for pid in pids if pid]) <= 1, pids
    assert_invariant(cluster)


def test_source_worker_killed_during_live_migration(
    cluster: Cluster, api, dirty_image: Image, fault: FaultRecord
):
    fault.describe(
        scenario="kill -9 of the source node worker during a live migration",
        action="live-migrate a memory-dirtying guest at 4 Mbit/s; SIGKILL the source worker while "
        "transferring; restart it",
        invariant="migration failed with an error; VM running on the source only (guest keeps ticking, "
        "disk marker intact); destination copy removed; capacity; a second migration then succeeds",
    )

    source, dest = list(cluster.nodes)
    vm_id = dirty_guest_with_marker(cluster, api, "src-kill", source, dirty_image.name, "before-the-fault")
    migration_id = _transferring(api, vm_id, dest, "live", 4, settle=1.5)
    cluster.nodes[source].kill()
    fault.injected()
    cluster.start_node(source)
    migration = wait_terminal(migration_id, 90)
    _failed_back_on_source(cluster, fault, migration, vm_id, source)
    # The source QEMU holds no leftover of the failed attempt: the next migration goes through.
    again = wait_terminal(_migrate(api, vm_id, dest, "live", None), 120)
    assert again.status == "completed", again.error
    assert_invariant(cluster)


def test_destination_worker_killed_during_live_migration(
    cluster: Cluster, api, dirty_image: Image, fault: FaultRecord
):
    fault.describe(
        scenario="kill -9 of the destination node worker during a live migration",
        action="live-migrate a memory-dirtying guest at 4 Mbit/s; SIGKILL the destination worker while "
        "transferring; restart it once the migration has failed",
        invariant="migration failed with an error; VM running on the source only (guest keeps ticking, "
        "disk marker intact); destination copy removed; capacity",
    )
    source, dest = list(cluster.nodes)
    vm_id = dirty_guest_with_marker(cluster, api, "dest-kill", source, dirty_image.name, "before-the-fault")
    migration_id = _transferring(api, vm_id, dest, "live", 4, settle=1)
    cluster.nodes[dest].kill()
    fault.injected()
    migration = wait_terminal(migration_id, 60)
    cluster.start_node(dest)  # the abort waiting in its queue removes the half-made copy
    _failed_back_on_source(cluster, fault, migration, vm_id, source)


def test_source_worker_killed_during_cold_migration(
    cluster: Cluster, api, fault: FaultRecord, tmp_path: Path
):
    fault.describe(
        scenario="kill -9 of the source node worker during a cold migration",
        action=f"cold-migrate a stopped VM with {DATA_MB} MiB of random data at 16 Mbit/s; SIGKILL the "
        "source worker mid-transfer; restart it",
        invariant="migration failed with an error; VM stopped on the source with a byte-identical disk "
        "(sha256); partial destination disk removed; capacity",
    )
    source, dest = list(cluster.nodes)
    vm_id, checksum = _stopped_with_data(cluster, api, "cold-kill", source, tmp_path)
    migration_id = _transferring(api, vm_id, dest, "cold", 16, settle=2)
    cluster.nodes[source].kill()
    fault.injected()
    cluster.start_node(source)
    migration = wait_terminal(migration_id, 90)
    assert_invariant(cluster)
    fault.recovered()
    fault.note(f"migration ended {migration.status}: {migration.error}")
    assert migration.status == "failed" and migration.error
    vm = VM.objects.select_related("node").get(pk=vm_id)
    assert vm.node.name == source and vm.state == "stopped"
    assert sha256(disk_path(cluster, source, vm_id)) == checksum
    assert not disk_path(cluster, dest, vm_id).exists()


def test_dwcp_connection_cut_during_cold_migration(cluster: Cluster, api, fault: FaultRecord, tmp_path: Path):
    fault.describe(
        scenario="DWCP connections cut mid-transfer",
        action=f"cold-migrate a stopped VM with {DATA_MB} MiB of random data at 16 Mbit/s; destroy every "
        "TCP connection to the destination's DWCP port (ss -K) mid-transfer",
        invariant="the disk transfer resumes and the migration completes; the VM is on exactly one node "
        "(the destination), stopped, with a byte-identical disk (sha256); capacity",
    )
    source, dest = list(cluster.nodes)
    vm_id, checksum = _stopped_with_data(cluster, api, "cut", source, tmp_path)
    migration_id = _transferring(api, vm_id, dest, "cold", 16, settle=2)
    _cut_dwcp(fault, dest)
    migration = wait_terminal(migration_id, 90)
    assert_invariant(cluster)
    fault.recovered()
    fault.note(f"migration ended {migration.status}: {migration.error or 'no error'}")
    # A reset is a cut (docs/migrations.md "A cut link"): DWCP resumes the file (it used to fail).
    assert migration.status == "completed", migration.error
    vm = VM.objects.select_related("node").get(pk=vm_id)
    assert vm.node.name == dest
    assert vm.state == "stopped"
    assert sha256(disk_path(cluster, vm.node.name, vm_id)) == checksum


def test_dwcp_connection_cut_during_live_migration(
    cluster: Cluster, api, dirty_image: Image, fault: FaultRecord
):
    fault.describe(
        scenario="DWCP connections cut during a live migration",
        action="live-migrate a memory-dirtying guest at 8 Mbit/s; destroy every TCP connection to the "
        "destination's DWCP port (ss -K) while transferring",
        invariant="the tunnels resume and the migration completes; the VM runs on exactly one node "
        "with its disk marker intact; capacity; a second migration then succeeds",
    )
    source, dest = list(cluster.nodes)
    vm_id = dirty_guest_with_marker(cluster, api, "live-cut", source, dirty_image.name, "through-the-cut")
    migration_id = _transferring(api, vm_id, dest, "live", 8, settle=1.5)
    _cut_dwcp(fault, dest)
    # The tunnels resume at once (a reset is a cut, docs/migrations.md); lifted, the 8 Mbit/s limit no
    # longer keeps the dirtying guest from converging.
    response = api.patch(f"/api/v1/migrations/{migration_id}/", {"bandwidth_limit_mbps": None}, format="json")
    assert response.status_code == 200, response.json()
    migration = wait_terminal(migration_id, 120)
    assert_invariant(cluster)
    fault.recovered()
    fault.note(f"migration ended {migration.status}: {migration.error or 'no error'}")
    assert migration.status == "completed", migration.error
    vm = VM.objects.select_related("node").get(pk=vm_id)
    assert vm.state == "running"
    assert disk_marker(cluster, vm.node.name, vm_id) == ["through-the-cut"]
    # Nothing of the cut attempt is left in the way: the VM moves again (or back).
    other = dest if vm.node.name == source else source
    again = wait_terminal(_migrate(api, vm_id, other, "live", None), 120)
    assert again.status == "completed", again.error
    assert_invariant(cluster)


def test_destination_disk_full_during_cold_migration(
    cluster: Cluster, api, fault: FaultRecord, tmp_path: Path
):
    fault.describe(
        scenario="destination disk full",
        action=f"mount an 8 MiB tmpfs as the destination's disks directory; cold-migrate a stopped VM "
        f"holding {DATA_MB} MiB of random data",
        invariant="migration failed with an error naming the cause; VM stopped on the source with a "
        "byte-identical disk; nothing left on the destination; capacity",
    )
    source, dest = list(cluster.nodes)
    vm_id, checksum = _stopped_with_data(cluster, api, "full", source, tmp_path)
    disks = cluster.data_dirs[dest] / "disks"
    disks.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disks)], check=True)
    try:
        migration_id = _migrate(api, vm_id, dest, "cold", None)
        fault.injected()
        migration = wait_terminal(migration_id, 90)
        assert_invariant(cluster)
        fault.recovered()
        fault.note(f"migration ended {migration.status}: {migration.error}")
        assert migration.status == "failed"
        assert "space" in migration.error.lower(), migration.error
        vm = VM.objects.select_related("node").get(pk=vm_id)
        assert vm.node.name == source and vm.state == "stopped"
        assert sha256(disk_path(cluster, source, vm_id)) == checksum
        try:
            wait_for(lambda: not any(disks.iterdir()), 30, "the partial disk to be removed")
        except AssertionError:
            raise AssertionError(f"left on the destination: {[p.name for p in disks.iterdir()]}") from None
        assert holders(cluster, vm_id) == [source]
        assert qemu_pid(cluster, source, vm_id) is None
    finally:
        subprocess.run(["umount", "-l", str(disks)], check=False)
