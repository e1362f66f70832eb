"""Live and cold migration between two real node workers, through DWCP, with the test guest under TCG."""

import os
import re
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from apps.migrations.models import Migration
from apps.vms.models import VM, Image, Node
from tests.streams_server import launch_streams
from tests.workers.node.conftest import Cluster, wait_for
from workers.qemu.memory import ram_mapping

__all__ = ["launch_streams"]  # a fixture of this module's tests

pytestmark = [pytest.mark.integration, pytest.mark.qemu, pytest.mark.django_db(transaction=True)]

TICK = re.compile(r"^tick (\d+)", re.M)


@pytest.fixture
def dirty_image(guest_image: Image) -> Image:
    guest_image.pk = None
    guest_image.name = "testguest-dirty"
    guest_image.cmdline = f"{guest_image.cmdline} dirty_mb=32 dirty_rate_mb=8"
    guest_image.save()
    return guest_image


class TickWatcher(threading.Thread):
    """Timestamps every tick line as it appears in a guest channel's log (polled every 5 ms)."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.ticks: list[tuple[int, float]] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        offset = 0
        buffer = ""
        while not self.stop_event.is_set():
            try:
                with self.path.open(errors="replace") as log:
                    log.seek(offset)
                    chunk = log.read()
                    offset = log.tell()
            except FileNotFoundError:
                chunk = ""
            if chunk:
                now = time.monotonic()
                buffer += chunk
                *lines, buffer = buffer.split("\n")
                for line in lines:
                    match = TICK.match(line.strip())
                    if match:
                        self.ticks.append((int(match.group(1)), now))
            time.sleep(0.005)


def _run_dir(cluster: Cluster, node: str, vm_id: str) -> Path:
    return cluster.data_dirs[node] / "run" / vm_id


def _silence(cluster: Cluster, node: str, vm_id: str) -> str:
    """What a guest's node shows when its guest channel stays silent: the run directory, the size and
    tail of the channel's and the console's logs (a kernel panic shows on the console), and the node's
    log (a completed live migration left the destination's guest silent in CI rehearsals: its kernel
    had panicked on RAM QEMU did not deliver, now caught by the memory check, see
    ``workers/qemu/memory.py``)."""
    run_dir = _run_dir(cluster, node, vm_id)
    files = sorted(path.name for path in run_dir.iterdir()) if run_dir.exists() else "missing"
    logs = []
    for name in ("guest.log", "serial.log"):
        log = run_dir / name
        tail = log.read_bytes()[-400:] if log.exists() else b"(missing)"
        size = log.stat().st_size if log.exists() else 0
        logs.append(f"{name} {size} bytes, tail {tail!r}")
    return f"run dir {files}; {'; '.join(logs)}; node log:\n{cluster.nodes[node].output()}"


def test_live_migration_keeps_the_guest_running(cluster: Cluster, api, dirty_image: Image):
    source, dest = list(cluster.nodes)
    payload = {
        "name": "mover",
        "image": dirty_image.name,
        "vcpus": 1,
        "memory_mb": 128,
        "disk_gb": 1,
        "node": source,
    }
    vm_id = api.post("/api/v1/vms/", payload, format="json").json()["id"]
    wait_for(lambda: VM.objects.get(pk=vm_id).state == "running", 60, "the VM to run")
    source_watch = TickWatcher(_run_dir(cluster, source, vm_id) / "guest.log")
    source_watch.start()
    wait_for(lambda: len(source_watch.ticks) >= 20, 60, "ticks on the source")
    response = api.post(f"/api/v1/vms/{vm_id}/migrate/", {"dest_node": dest, "mode": "live"}, format="json")
    assert response.status_code == 202, response.json()
    migration_id = response.json()["id"]
    dest_watch = TickWatcher(_run_dir(cluster, dest, vm_id) / "guest.log")
    dest_watch.start()
    percents: list[float] = []

    def finished() -> bool:
        body = api.get(f"/api/v1/migrations/{migration_id}/").json()
        percents.append(body["percent"])
        return body["status"] in ("completed", "failed", "cancelled")

    wait_for(finished, 180, "the migration to end", interval=0.25)
    migration = Migration.objects.get(pk=migration_id)
    assert migration.status == "completed", (
        migration.error,
        list(migration.events.values_list("detail", flat=True)),
    )
    try:
        wait_for(lambda: len(dest_watch.ticks) >= 10, 30, "ticks on the destination")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; {_silence(cluster, dest, vm_id)}") from None
    source_watch.stop_event.set()
    dest_watch.stop_event.set()

    vm = VM.objects.get(pk=vm_id)
    assert vm.node.name == dest and vm.state == "running"
    assert percents == sorted(percents), f"percent ran backwards: {percents}"
    assert percents[-1] == 100.0
    # The source's final figures may land just after the destination's switch completed it.
    wait_for(
        lambda: "qemu_downtime_ms" in Migration.objects.get(pk=migration_id).stats, 30, "the source's report"
    )
    body = api.get(f"/api/v1/migrations/{migration_id}/").json()
    assert body["downtime_ms"] is not None and body["total_seconds"] > 0
    assert body["wire_bytes"] > 0
    # Under TCG (these tests) both nodes compared the guest's RAM before the destination resumed.
    assert body["stats"]["memory_check"] == "match", body["stats"]
    assert [
        event["to_status"] for event in body["history"] if event["from_status"] != event["to_status"]
    ] == ["queued", "preparing", "transferring", "switching", "completed"]
    # The counter continues on the destination where it stopped on the source.
    last_source_tick, last_source_at = source_watch.ticks[-1]
    first_dest_tick, first_dest_at = dest_watch.ticks[0]
    assert first_dest_tick in (last_source_tick, last_source_tick + 1, last_source_tick + 2), (
        last_source_tick,
        first_dest_tick,
    )
    gap_ms = (first_dest_at - last_source_at) * 1000
    stats = body["stats"]
    timeline = {
        name: round((stats[name] - stats["source_stopped_at"]) * 1000, 1)
        for name in ("mirror_completed_at", "source_completed_at", "dest_completed_at", "dest_resumed_at")
    }
    print(
        f"guest pause {body['downtime_ms']} ms (QEMU: {stats['qemu_downtime_ms']} ms; ms after the source stopped: "
        f"{timeline}); tick gap {gap_ms:.0f} ms; total {body['total_seconds']} s; wire {body['wire_bytes']} B"
    )
    # Ticks come every 100 ms; under TCG the destination also re-translates the guest's code after the
    # switch, so the first tick there trails the resume by a few hundred ms.
    assert gap_ms < 100 + body["downtime_ms"] + 1500
    # Capacity moved with the VM; the source copy is gone.
    wait_for(lambda: not _run_dir(cluster, source, vm_id).exists(), 30, "the source copy to be removed")
    assert Node.objects.get(name=source).allocated_vcpus == 0
    assert Node.objects.get(name=dest).allocated_vcpus == 1


def _write_guest_ram(pid: int, memory_mb: int, address: int, data: bytes) -> None:
    """Write ``data`` at guest-physical ``address`` of a running QEMU behind its back (root: /proc/PID/mem).

    QEMU's dirty tracking never sees such a write: to a migration it is exactly a guest write that
    QEMU lost.
    """
    with open(f"/proc/{pid}/mem", "r+b", buffering=0) as memory:
        memory.seek(ram_mapping(pid, memory_mb) + address)
        memory.write(data)


@pytest.mark.skipif(os.geteuid() != 0, reason="writes another process's memory: needs root")
def test_a_guest_write_lost_by_qemu_is_caught_before_the_destination_runs(
    cluster: Cluster, api, dirty_image: Image
):
    """QEMU 7.2 under TCG was measured losing guest writes in live migrations (a page written after
    its last transfer, never resent; the destination's kernel oopsed). A write QEMU cannot see, made
    once the migration copied that page, stands for it: the RAM check at the switch finds the
    difference, the destination copy never runs, and the guest goes on where it was."""
    source, dest = list(cluster.nodes)
    vm_id = _create_running(api, "lost-write", source, dirty_image.name)
    migration_id = _migrate_live(api, vm_id, dest, bandwidth_limit_mbps=100)
    # Past 55 % the memory phase has copied the first 10 % of RAM, the page at 16 KiB among it
    # (reserved low memory the guest kernel leaves alone).
    wait_for(
        lambda: api.get(f"/api/v1/migrations/{migration_id}/").json()["percent"] >= 55,
        120,
        "the memory phase",
        interval=0.1,
    )
    pid = int((_run_dir(cluster, source, vm_id) / "qemu.pid").read_text())
    _write_guest_ram(pid, 128, 0x4000, b"written behind QEMU's back")
    wait_for(
        lambda: Migration.objects.get(pk=migration_id).status in ("completed", "failed", "cancelled"),
        120,
        "the migration to end",
    )
    assert Migration.objects.get(pk=migration_id).status == "failed"
    # Both sides report the failure, in either order: the destination its measurement, the source that it
    # resumed on the destination's verdict. Once both are in, the error must be the measurement.
    wait_for(
        lambda: all(
            Migration.objects.filter(pk=migration_id, events__detail__contains=text).exists()
            for text in ("guest memory arrived different", "the destination's memory check failed")
        ),
        60,
        "both sides' failure reports",
    )
    migration = Migration.objects.get(pk=migration_id)
    rollback = migration.events.filter(to_status="failed").exclude(from_status="failed").get()
    rolled_back_by = rollback.detail.split()[0]
    print(f"the {rolled_back_by}'s report came first")  # the race this test must not depend on
    assert migration.error_cause == "measured", migration.error
    # The MiB written behind QEMU's back at least; QEMU under TCG may lose a page or two of its own in
    # the same migration (the check catches those too: "3 of 128 MiB" was seen in a CI rehearsal).
    differing = re.search(
        r"^dest .*: MemoryMismatch: guest memory arrived different from the source's in (\d+) of 128 MiB",
        migration.error,
    )
    assert differing is not None and int(differing[1]) >= 1, migration.error
    vm = VM.objects.get(pk=vm_id)
    assert vm.node.name == source and vm.state == "running"
    log = _run_dir(cluster, source, vm_id) / "guest.log"
    size = log.stat().st_size
    wait_for(lambda: log.stat().st_size > size, 15, "the source guest to keep running")
    assert Node.objects.get(name=dest).allocated_vcpus == 0
    wait_for(lambda: not _run_dir(cluster, dest, vm_id).exists(), 60, "the destination copy to be removed")


def test_cold_migration_moves_a_stopped_vm(cluster: Cluster, api, guest_image: Image):
    source, dest = list(cluster.nodes)
    payload = {
        "name": "coldie",
        "image": "testguest",
        "vcpus": 1,
        "memory_mb": 128,
        "disk_gb": 1,
        "node": source,
    }
    vm_id = api.post("/api/v1/vms/", payload, format="json").json()["id"]
    wait_for(lambda: VM.objects.get(pk=vm_id).state == "running", 60, "the VM to run")
    response = api.post(f"/api/v1/vms/{vm_id}/migrate/", {"dest_node": dest, "mode": "cold"}, format="json")
    assert response.status_code == 202
    migration_id = response.json()["id"]
    wait_for(
        lambda: Migration.objects.get(pk=migration_id).status in ("completed", "failed", "cancelled"),
        120,
        "the cold migration to end",
    )
    migration = Migration.objects.get(pk=migration_id)
    assert migration.status == "completed", (
        migration.error,
        list(migration.events.values_list("detail", flat=True)),
    )
    vm = VM.objects.get(pk=vm_id)
    assert vm.node.name == dest and vm.state == "running"
    assert (cluster.data_dirs[dest] / "disks" / f"{vm_id}.qcow2").exists()
    wait_for(
        lambda: not (cluster.data_dirs[source] / "disks" / f"{vm_id}.qcow2").exists(),
        30,
        "source disk removal",
    )


def test_cancel_while_queued_and_while_transferring(cluster: Cluster, api, dirty_image: Image, settings):
    source, dest = list(cluster.nodes)
    payload = {
        "name": "cancelme",
        "image": dirty_image.name,
        "vcpus": 1,
        "memory_mb": 128,
        "disk_gb": 1,
        "node": source,
    }
    vm_id = api.post("/api/v1/vms/", payload, format="json").json()["id"]
    wait_for(lambda: VM.objects.get(pk=vm_id).state == "running", 60, "the VM to run")
    # A tight bandwidth limit keeps it transferring long enough to cancel mid-way.
    migration_id = _migrate_live(api, vm_id, dest, bandwidth_limit_mbps=2)
    wait_for(lambda: Migration.objects.get(pk=migration_id).status == "transferring", 60, "transferring")
    time.sleep(1)
    assert api.post(f"/api/v1/migrations/{migration_id}/cancel/").status_code == 202
    wait_for(lambda: Migration.objects.get(pk=migration_id).status == "cancelled", 90, "the cancel")
    vm = VM.objects.get(pk=vm_id)
    assert vm.node.name == source and vm.state == "running"
    wait_for(lambda: not _run_dir(cluster, dest, vm_id).exists(), 30, "the destination copy to be removed")
    assert Node.objects.get(name=dest).allocated_vcpus == 0
    # The source keeps running: its guest channel's log keeps growing.
    log = _run_dir(cluster, source, vm_id) / "guest.log"
    size = log.stat().st_size
    wait_for(lambda: log.stat().st_size > size, 10, "the source guest to keep printing")


def _migrate_live(api, vm_id: str, dest: str, *, bandwidth_limit_mbps: int) -> str:
    """Start a live migration of ``vm_id`` to ``dest`` under a DWCP bandwidth limit; its id."""
    response = api.post(
        f"/api/v1/vms/{vm_id}/migrate/",
        {"dest_node": dest, "mode": "live", "bandwidth_limit_mbps": bandwidth_limit_mbps},
        format="json",
    )
    assert response.status_code == 202, response.json()
    return response.json()["id"]


def _create_running(api, name: str, node: str, image: str = "testguest") -> str:
    payload = {"name": name, "image": image, "vcpus": 1, "memory_mb": 128, "disk_gb": 1, "node": node}
    vm_id = api.post("/api/v1/vms/", payload, format="json").json()["id"]
    wait_for(lambda: VM.objects.get(pk=vm_id).state == "running", 90, f"{name} to run")
    return vm_id


def test_drain_moves_three_vms_two_at_a_time(cluster: Cluster, api, staff_api):
    source, dest = list(cluster.nodes)
    vm_ids = [_create_running(api, f"d{i}", source) for i in range(3)]
    node_id = Node.objects.get(name=source).pk
    assert api.post(f"/api/v1/nodes/{node_id}/drain/").status_code == 403  # staff only
    response = staff_api.post(f"/api/v1/nodes/{node_id}/drain/")
    assert response.status_code == 202
    body = response.json()
    assert body["status"] == "draining"
    assert [item["result"] for item in body["vms"]] == ["live migration queued"] * 3
    seen_running: set[int] = set()
    seen_queued = False

    def drained() -> bool:
        nonlocal seen_queued
        statuses = list(Migration.objects.filter(vm_id__in=vm_ids).values_list("status", flat=True))
        seen_running.add(sum(status in ("preparing", "transferring", "switching") for status in statuses))
        seen_queued = seen_queued or "queued" in statuses
        return all(status in ("completed", "failed", "cancelled") for status in statuses)

    wait_for(drained, 240, "the drain", interval=0.1)
    assert set(Migration.objects.filter(vm_id__in=vm_ids).values_list("status", flat=True)) == {"completed"}
    assert max(seen_running) <= 2 and seen_queued
    assert set(VM.objects.filter(pk__in=vm_ids).values_list("node__name", flat=True)) == {dest}
    wait_for(
        lambda: Node.objects.get(name=source).status == "maintenance", 10, "the node to reach maintenance"
    )


def test_destination_worker_killed_mid_transfer_fails_cleanly(cluster: Cluster, api, dirty_image: Image):
    source, dest = list(cluster.nodes)
    vm_id = _create_running(api, "orphaned", source, dirty_image.name)
    migration_id = _migrate_live(api, vm_id, dest, bandwidth_limit_mbps=4)
    wait_for(lambda: Migration.objects.get(pk=migration_id).status == "transferring", 60, "transferring")
    time.sleep(1)
    cluster.nodes[dest].kill()
    wait_for(
        lambda: Migration.objects.get(pk=migration_id).status == "failed", 60, "the failure to be recorded"
    )
    vm = VM.objects.get(pk=vm_id)
    assert vm.node.name == source and vm.state == "running"
    log = _run_dir(cluster, source, vm_id) / "guest.log"
    size = log.stat().st_size
    try:
        wait_for(lambda: log.stat().st_size > size, 10, "the source guest to keep running")
    except AssertionError as exc:  # seen once in a loaded CI rehearsal: keep what the source node saw
        raise AssertionError(f"{exc}; source node log:\n{cluster.nodes[source].output()}") from None
    assert Node.objects.get(name=dest).allocated_vcpus == 0
    cluster.start_node(dest)  # the abort waiting in its queue removes the half-made copy
    wait_for(lambda: not _run_dir(cluster, dest, vm_id).exists(), 60, "the destination copy to be removed")


def test_bandwidth_change_applies_while_it_runs_and_sse_streams_progress(
    cluster: Cluster, api, dirty_image: Image, launch_streams
):
    source, dest = list(cluster.nodes)
    vm_id = _create_running(api, "throttled", source, dirty_image.name)
    migration_id = _migrate_live(api, vm_id, dest, bandwidth_limit_mbps=8)
    wait_for(lambda: Migration.objects.get(pk=migration_id).status == "transferring", 60, "transferring")
    response = api.patch(f"/api/v1/migrations/{migration_id}/", {"bandwidth_limit_mbps": None}, format="json")
    assert response.status_code == 200 and response.json()["bandwidth_limit_mbps"] is None
    path = f"/api/v1/migrations/{migration_id}/events/"
    redirect = api.get(path, HTTP_ACCEPT="text/event-stream")  # the REST API points to the streams service
    assert redirect.status_code == 307 and redirect["Location"].endswith(path)
    with httpx.stream(
        "GET", launch_streams() + path, headers={"Authorization": f"Token {api.token_secret}"}, timeout=120
    ) as stream:
        assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
        text = stream.read().decode()
    # Each event's block: an optional "id:" line, then "event:" and "data:" (comments and "retry:" apart).
    events = [block[block.index("event: ") :] for block in text.split("\n\n") if "event: " in block]
    assert events[-1].startswith("event: end")
    assert '"status": "completed"' in events[-1]
    percents = [
        float(re.search(r'"percent": ([0-9.]+)', block).group(1))
        for block in events
        if block.startswith("event: progress")
    ]
    assert percents == sorted(percents) and percents[-1] == 100.0
    history = api.get(f"/api/v1/migrations/{migration_id}/").json()["history"]
    assert any("bandwidth limit lifted" in event["detail"] for event in history)


def test_live_migration_keeps_memory_and_disk(cluster: Cluster, api, dirty_image: Image, tmp_path: Path):
    """The guest's memory checksum, a marker it wrote to its disk and the whole disk (``qemu-img
    compare`` of a copy taken before the move with the destination's disk) are the same after it."""
    from workers.guest.boot import GuestChannel

    source, dest = list(cluster.nodes)
    vm_id = _create_running(api, "keeper", source, dirty_image.name)
    channel = GuestChannel.connect(_run_dir(cluster, source, vm_id) / "guest.sock", timeout=30)
    try:
        channel.wait_for(r"dirty ready", 120)
        channel.request("pause", timeout=60)  # the dirtier stops so the region has one checksum
        before = channel.checksum()
        channel.request("disk-write", "migrated-intact", timeout=60)
    finally:
        channel.close()
    # The guest writes nothing more to its disk: a copy now is what the destination must end with
    # (-U: read while the running QEMU holds the image).
    copy = tmp_path / "before.qcow2"
    source_disk = cluster.data_dirs[source] / "disks" / f"{vm_id}.qcow2"
    subprocess.run(["qemu-img", "convert", "-U", "-O", "qcow2", str(source_disk), str(copy)], check=True)
    migration_id = api.post(f"/api/v1/vms/{vm_id}/migrate/", {"dest_node": dest}, format="json").json()["id"]
    wait_for(
        lambda: Migration.objects.get(pk=migration_id).status in ("completed", "failed", "cancelled"),
        120,
        "the move",
    )
    assert Migration.objects.get(pk=migration_id).status == "completed"
    channel = GuestChannel.connect(_run_dir(cluster, dest, vm_id) / "guest.sock", timeout=30)
    try:
        assert channel.checksum() == before
        assert channel.request("disk-read", timeout=60) == ["migrated-intact"]
    finally:
        channel.close()
    dest_disk = cluster.data_dirs[dest] / "disks" / f"{vm_id}.qcow2"
    compared = subprocess.run(
        ["qemu-img", "compare", "-U", str(copy), str(dest_disk)], capture_output=True, text=True, check=False
    )
    assert compared.returncode == 0, compared.stdout + compared.stderr  # 0: identical contents


def test_ping_pong_migration_back_before_the_source_is_cleaned(cluster: Cluster, api):
    """Straight back to the node it just left: the leftover source copy there gives way."""
    first, second = list(cluster.nodes)
    vm_id = _create_running(api, "pingpong", first)
    for there in (second, first):
        migration_id = api.post(f"/api/v1/vms/{vm_id}/migrate/", {"dest_node": there}, format="json").json()[
            "id"
        ]
        wait_for(
            lambda: Migration.objects.get(pk=migration_id).status in ("completed", "failed", "cancelled"),  # noqa: B023
            120,
            "the migration",
        )
        migration = Migration.objects.get(pk=migration_id)
        assert migration.status == "completed", migration.error
        assert VM.objects.get(pk=vm_id).node.name == there
    wait_for(
        lambda: not _run_dir(cluster, second, vm_id).exists(), 30, "the second node's copy to be removed"
    )
    assert (Node.objects.get(name=first).allocated_vcpus, Node.objects.get(name=second).allocated_vcpus) == (
        1,
        0,
    )
