"""Control of live migrations with real guests: cancel in each transfer phase, and the per-node limit.

Cancelling must leave nothing half-done: the VM runs on its source only, the destination's copy and
reservation are gone, and a migration of the same VM afterwards completes. With the per-node limit at
two, a third migration between the same nodes waits in ``queued`` until one of the first two ends.
The limits come from the control worker's environment (``cluster_extra_env``): it is its own process.
"""

import os
import subprocess
import time

import pytest
from django.db.models import F

from apps.migrations.models import Migration, MigrationEvent
from apps.vms.models import VM, Image, Node
from tests.workers.node.conftest import Cluster, wait_for
from tests.workers.node.test_migration import (
    TickWatcher,
    _create_running,
    _run_dir,
    dirty_image,  # noqa: F401 (fixture)
)
from tests.workers.node.test_migration_force_complete import _qemu_run_dirs

pytestmark = [pytest.mark.integration, pytest.mark.qemu, pytest.mark.django_db(transaction=True)]

MAX_PER_NODE = 2
RUNNING = ("preparing", "transferring", "switching")
ENDED = ("completed", "failed", "cancelled")
# Mbit/s on DWCP, the lowest the API takes. The disk phase copies only the disk's data: an empty disk
# is mirrored in about 0.3 s whatever the limit (measured), so for the disk case the disk first gets
# DISK_FILL_MB of random data, about 17 s at this rate. The memory phase needs no help: the dirty
# guest rewrites 32 MiB of RAM at 8 MiB/s.
CANCEL_BANDWIDTH_MBPS = 1
DISK_FILL_MB = 2
# Slow enough that two transfers overlap for a while, fast enough that three fit in the time budget.
CONCURRENT_BANDWIDTH_MBPS = 24


@pytest.fixture
def cluster_extra_env() -> dict[str, str]:
    return {"MIGRATION_MAX_OUTGOING": str(MAX_PER_NODE), "MIGRATION_MAX_INCOMING": str(MAX_PER_NODE)}


def _status(migration_id: str) -> str:
    return str(Migration.objects.values_list("status", flat=True).get(pk=migration_id))


def _wait_ended(migration_id: str, timeout: float, what: str) -> Migration:
    wait_for(lambda: _status(migration_id) in ENDED, timeout, what, interval=0.1)
    return Migration.objects.get(pk=migration_id)


def _details(migration_id: str) -> list[str]:
    return list(MigrationEvent.objects.filter(migration_id=migration_id).values_list("detail", flat=True))


def _capacity(node: str) -> tuple[int, int, int]:
    row = Node.objects.get(name=node)
    return row.allocated_vcpus, row.allocated_memory_mb, row.allocated_disk_gb


def _demand(vm_ids: list[str]) -> tuple[int, int, int]:
    vms = list(VM.objects.filter(pk__in=vm_ids))
    return sum(vm.vcpus for vm in vms), sum(vm.memory_mb for vm in vms), sum(vm.disk_gb for vm in vms)


def _fill_disk(cluster: Cluster, api, node: str, vm_id: str, megabytes: int) -> None:
    """Write random data into the VM's disk while it is stopped (a running QEMU holds its write lock)."""
    assert api.post(f"/api/v1/vms/{vm_id}/stop/").status_code == 202
    wait_for(lambda: VM.objects.get(pk=vm_id).state == "stopped", 60, "the VM to stop")
    disk = cluster.data_dirs[node] / "disks" / f"{vm_id}.qcow2"
    random_data = cluster.workdir / "random.bin"
    random_data.write_bytes(os.urandom(megabytes << 20))
    subprocess.run(
        ["qemu-io", "-f", "qcow2", str(disk), "-c", f"write -q -s {random_data} 0 {megabytes}M"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    assert api.post(f"/api/v1/vms/{vm_id}/start/").status_code == 202
    wait_for(
        lambda: VM.objects.filter(pk=vm_id, state="running", pending_action="").exists(),
        60,
        "the VM to run again",
    )


@pytest.mark.parametrize("phase", ["disk", "memory"])
def test_cancel_in_a_transfer_phase_leaves_the_guest_running_on_its_source_only(
    cluster: Cluster,
    api,
    dirty_image: Image,  # noqa: F811
    phase: str,
):
    source, dest = list(cluster.nodes)
    started = time.monotonic()
    vm_id = _create_running(api, f"cancel-{phase}", source, dirty_image.name)
    if phase == "disk":
        _fill_disk(cluster, api, source, vm_id, DISK_FILL_MB)
    watch = TickWatcher(_run_dir(cluster, source, vm_id) / "guest.log")
    watch.start()
    wait_for(lambda: len(watch.ticks) >= 5, 60, "ticks on the source")
    response = api.post(
        f"/api/v1/vms/{vm_id}/migrate/",
        {"dest_node": dest, "mode": "live", "bandwidth_limit_mbps": CANCEL_BANDWIDTH_MBPS},
        format="json",
    )
    assert response.status_code == 202, response.json()
    migration_id = response.json()["id"]
    requested = time.monotonic()
    wait_for(
        lambda: Migration.objects.filter(pk=migration_id, status="transferring", phase=phase).exists(),
        60,
        f"the {phase} phase",
        interval=0.05,
    )
    reached = time.monotonic()
    time.sleep(1)  # the phase's data is on its way, not just announced
    response = api.post(f"/api/v1/migrations/{migration_id}/cancel/")
    assert response.status_code == 202, response.json()
    cancel_at = time.monotonic()
    migration = _wait_ended(migration_id, 60, "the cancel")
    assert migration.status == "cancelled", (migration.error, _details(migration_id))
    cancelled = time.monotonic()
    details = _details(migration_id)
    cancel_index = details.index("cancel requested")
    # The cancel met the phase it was aimed at: the source had not announced memory yet (disk), or
    # had before the request (memory).
    phase_changes = [index for index, detail in enumerate(details) if detail == "phase memory"]
    if phase == "disk":
        assert phase_changes == [], details
    else:
        assert phase_changes and phase_changes[0] < cancel_index, details

    # The VM stays on its source, running, and only there.
    vm = VM.objects.get(pk=vm_id)
    assert (vm.node.name, vm.state) == (source, "running")
    wait_for(lambda: not _run_dir(cluster, dest, vm_id).exists(), 30, "the destination copy to be removed")
    wait_for(
        lambda: _qemu_run_dirs(vm_id) == [_run_dir(cluster, source, vm_id)],
        15,
        "the destination QEMU to quit",
    )
    assert _capacity(dest) == (0, 0, 0)
    assert _capacity(source) == _demand([vm_id])
    # The guest never stopped: its tick counter goes on, without a restart.
    ticks_at_cancel = len(watch.ticks)
    wait_for(lambda: len(watch.ticks) >= ticks_at_cancel + 10, 30, "ticks after the cancel")
    numbers = [number for number, _ in watch.ticks]
    assert numbers == sorted(numbers), "the tick counter restarted: the guest was rebooted"

    # Nothing was left half-done: the same VM migrates afterwards.
    response = api.post(f"/api/v1/vms/{vm_id}/migrate/", {"dest_node": dest, "mode": "live"}, format="json")
    assert response.status_code == 202, response.json()
    again_id = response.json()["id"]
    again = _wait_ended(again_id, 90, "the second migration")
    watch.stop_event.set()
    assert again.status == "completed", (again.error, _details(again_id))
    vm = VM.objects.get(pk=vm_id)
    assert (vm.node.name, vm.state) == (dest, "running")
    wait_for(lambda: not _run_dir(cluster, source, vm_id).exists(), 30, "the source copy to be removed")
    assert _qemu_run_dirs(vm_id) == [_run_dir(cluster, dest, vm_id)]
    assert _capacity(source) == (0, 0, 0)
    assert _capacity(dest) == _demand([vm_id])
    transitions = MigrationEvent.objects.filter(migration_id=migration_id)
    disk_began = transitions.get(to_status="transferring", from_status="preparing").at
    memory_began = transitions.filter(detail="phase memory").values_list("at", flat=True).first()
    disk_seconds = f"{(memory_began - disk_began).total_seconds():.1f} s" if memory_began else "(cancelled)"
    print(
        f"cancel in {phase}: disk phase {disk_seconds}; phase reached {reached - requested:.1f} s after the request, cancelled "
        f"{cancelled - cancel_at:.1f} s after POST cancel; second migration "
        f"{again.stats.get('total_seconds')} s; test {time.monotonic() - started:.0f} s"
    )


def test_third_migration_waits_in_queue_while_two_transfer(cluster: Cluster, api, guest_image: Image):
    source, dest = list(cluster.nodes)
    started = time.monotonic()
    vm_ids = [_create_running(api, f"conc{index}", source) for index in range(3)]
    booted = time.monotonic()
    migration_ids = []
    for vm_id in vm_ids:
        response = api.post(
            f"/api/v1/vms/{vm_id}/migrate/",
            {"dest_node": dest, "mode": "live", "bandwidth_limit_mbps": CONCURRENT_BANDWIDTH_MBPS},
            format="json",
        )
        assert response.status_code == 202, response.json()
        migration_ids.append(response.json()["id"])
    most_running = 0
    # Per poll: which migrations were queued, which were running, which had ended.
    samples: list[dict[str, str]] = []

    def all_ended() -> bool:
        nonlocal most_running
        rows = Migration.objects.filter(pk__in=migration_ids).values_list("id", "status")
        statuses = {str(key): str(value) for key, value in rows}
        samples.append(statuses)
        most_running = max(most_running, sum(status in RUNNING for status in statuses.values()))
        return all(status in ENDED for status in statuses.values())

    wait_for(all_ended, 180, "the three migrations", interval=0.05)
    finished = time.monotonic()
    for migration_id in migration_ids:
        migration = Migration.objects.get(pk=migration_id)
        assert migration.status == "completed", (migration.error, _details(migration_id))
    assert most_running == MAX_PER_NODE, f"at most {MAX_PER_NODE} at once, saw {most_running}"

    # The one that waited: queued while two others ran.
    waited = {
        migration_id
        for sample in samples
        for migration_id, status in sample.items()
        if status == "queued" and sum(other in RUNNING for other in sample.values()) == MAX_PER_NODE
    }
    assert len(waited) == 1, samples[:5]
    (third,) = waited
    # From the recorded transitions: it started only after another had completed, and no more than
    # two were ever between preparing and their end.
    events = list(
        MigrationEvent.objects.filter(migration_id__in=migration_ids)
        .exclude(from_status="")
        .exclude(from_status=F("to_status"))
        .values_list("migration_id", "to_status", "at")
    )
    started_at = {str(mid): at for mid, to, at in events if to == "preparing"}
    ended_at = {str(mid): at for mid, to, at in events if to in ENDED}
    first_completed = min(at for mid, at in ended_at.items() if mid != third)
    assert started_at[third] >= first_completed, (started_at, ended_at)
    for moment in started_at.values():
        overlapping = sum(started_at[mid] <= moment < ended_at[mid] for mid in started_at)
        assert overlapping <= MAX_PER_NODE, (started_at, ended_at)

    # Every VM runs on the destination only; capacity follows the VMs.
    for vm_id in vm_ids:
        vm = VM.objects.get(pk=vm_id)
        assert (vm.node.name, vm.state) == (dest, "running")
        wait_for(lambda: not _run_dir(cluster, source, vm_id).exists(), 30, "the source copies to be removed")  # noqa: B023
        assert _qemu_run_dirs(vm_id) == [_run_dir(cluster, dest, vm_id)]
    assert _capacity(source) == (0, 0, 0)
    assert _capacity(dest) == _demand(vm_ids)
    waits = {
        mid[:8]: round((started_at[mid] - min(started_at.values())).total_seconds(), 1) for mid in started_at
    }
    durations = {
        str(mid)[:8]: stats.get("total_seconds")
        for mid, stats in Migration.objects.filter(pk__in=migration_ids).values_list("id", "stats")
    }
    print(
        f"three migrations: boot {booted - started:.0f} s, migrations {finished - booted:.1f} s; "
        f"started after the first (s): {waits}; each took (s): {durations}; most at once {most_running}; "
        f"test {time.monotonic() - started:.0f} s"
    )
