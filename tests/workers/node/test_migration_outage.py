"""Live migrations across a cut link: the two nodes run in network namespaces (``tests/netlab.py``, a
private Redis on the lab's bridge) and the test drops every packet between them with an nft rule in
the source's namespace (a firewall drop / link down that leaves both nodes' Redis, the control plane's
view, alone). A 10 s cut in the disk phase and a 60 s cut in the memory phase: each migration
completes, the memory check matches, the destination's disk equals the source's, the guest ticked on
the source throughout the cut, progress showed ``link: reconnecting``. A cut longer than the nodes'
outage limit fails the migration with that reason and the VM runs on its source only.

Cold migrations (DWCP file transfers) the same: a stopped VM's disk cut for 10 s and for 60 s arrives
byte-identical (``qemu-img compare``) in the same transfer, the VM stays stopped (no QEMU anywhere) and
ends on the destination only; a cut above the limit fails cleanly: the VM stays on its source, the
destination keeps nothing (no disk, no partial file, no journal).

The source's link is shaped (tc tbf) so that each phase lasts long enough to be cut in.
"""

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from apps.migrations.models import Migration
from apps.vms.models import VM, Image
from bench.migration.netns import drop_peer, undrop_peer
from tests.faults.invariants import disk_path
from tests.faults.test_node_faults import _stopped_with_data
from tests.netlab import NetLab
from tests.networks.conftest import cluster_redis_url  # noqa: F401 - fixture (a private Redis on the lab)
from tests.workers.node import test_migration_forecast as forecast_tests
from tests.workers.node.conftest import Cluster, wait_for
from tests.workers.node.test_migration import TickWatcher, _create_running, _run_dir
from tests.workers.node.test_migration_control import _fill_disk
from tests.workers.node.test_migration_force_complete import _qemu_run_dirs
from tests.workers.node.test_migration_forecast import Snapshots, _migrate, _shape

pytestmark = [pytest.mark.integration, pytest.mark.qemu, pytest.mark.django_db(transaction=True)]

# The forecast tests' lab: two node namespaces, their hosts for the cluster, a guest dirtying 1 MiB/s.
lab = forecast_tests.lab
cluster_hosts = forecast_tests.cluster_hosts
slow_dirty_image = forecast_tests.slow_dirty_image

OUTAGE_LIMIT_SECONDS = 75  # above the longest cut that must be survived (60 s)
LINK = "40mbit"  # ~5 MB/s: the guest's 32 MiB of dirtied RAM take several seconds to cross
DISK_DATA_MB = 40  # random data written into the VM's disk (the test guest writes only a marker)


@pytest.fixture
def cluster_extra_env(request: pytest.FixtureRequest) -> dict[str, str]:
    limit = str(getattr(request, "param", OUTAGE_LIMIT_SECONDS))
    return {"NODE_LINK_OUTAGE_SECONDS": limit, "MIGRATION_LINK_OUTAGE_SECONDS": limit}


class Cut:
    """Drops every packet between the two nodes (nft, in the source's namespace) while active."""

    def __init__(self, net: NetLab) -> None:
        self.host = net.hosts[0]
        self.peer = net.hosts[1].address
        self.started = self.ended = 0.0

    def __enter__(self) -> "Cut":
        drop_peer(self.host.netns, self.peer)
        self.started = time.monotonic()
        return self

    def __exit__(self, *exc_info: object) -> None:
        undrop_peer(self.host.netns)
        self.ended = time.monotonic()


def _phase_of(snapshots: Snapshots) -> str | None:
    return next((body.get("phase") for _, body in reversed(snapshots.messages) if body.get("phase")), None)


def _disk_copy(cluster: Cluster, node: str, vm_id: str, into: Path) -> Path:
    disk = cluster.data_dirs[node] / "disks" / f"{vm_id}.qcow2"
    subprocess.run(["qemu-img", "convert", "-U", "-O", "qcow2", str(disk), str(into)], check=True)
    return into


def _assert_identical(before: Path, after: Path) -> None:
    compared = subprocess.run(
        ["qemu-img", "compare", "-U", str(before), str(after)], capture_output=True, text=True, check=False
    )
    assert compared.returncode == 0, compared.stdout + compared.stderr


def _cut_during(
    cluster: Cluster, net: NetLab, api, image: Image, tmp_path: Path, *, phase: str, seconds: float
) -> tuple[str, str, Cut, TickWatcher, list[dict[str, Any]]]:
    """Start a live migration, cut the link for ``seconds`` once its progress shows ``phase``."""
    from workers.guest.boot import GuestChannel

    source, dest = list(cluster.nodes)
    vm_id = _create_running(api, f"cut-{phase}", source, image.name)
    _fill_disk(cluster, api, source, vm_id, DISK_DATA_MB)  # its mirror then takes seconds over LINK
    channel = GuestChannel.connect(_run_dir(cluster, source, vm_id) / "guest.sock", timeout=30)
    try:
        channel.wait_for(r"dirty ready", 120)
    finally:
        channel.close()
    _disk_copy(cluster, source, vm_id, tmp_path / "before.qcow2")
    ticks = TickWatcher(_run_dir(cluster, source, vm_id) / "guest.log")
    ticks.start()
    _shape(net, LINK)
    snapshots = Snapshots()
    migration_id = _migrate(api, vm_id, dest)
    wait_for(lambda: _phase_of(snapshots) == phase, 120, f"the {phase} phase", interval=0.02)
    seen: list[dict[str, Any]] = []
    with Cut(net) as cut:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            seen.append(api.get(f"/api/v1/migrations/{migration_id}/").json())
            time.sleep(0.5)
    snapshots.stop(migration_id, f"outage_{phase}")
    return vm_id, migration_id, cut, ticks, seen


def _completed_through(
    api, migration_id: str, cut: Cut, seen: list[dict[str, Any]]
) -> tuple[list[tuple[str, str]], list[dict[str, Any]]]:
    """The migration completed, and showed the cut only as a reconnecting link (running all along).
    Returns its history and the API's views of it while reconnecting."""
    url = f"/api/v1/migrations/{migration_id}/"
    wait_for(lambda: api.get(url).json()["status"] in ("completed", "failed", "cancelled"), 180, "the end")
    migration = Migration.objects.get(pk=migration_id)
    history = list(migration.events.order_by("at", "id").values_list("actor", "detail"))
    assert migration.status == "completed", (migration.error, history)
    reconnecting = [body for body in seen if body["link"] == "reconnecting"]
    assert reconnecting, [(body["status"], body["link"]) for body in seen]
    assert all(body["status"] == "transferring" for body in seen), [body["status"] for body in seen]
    assert max(body["outage_seconds"] for body in reconnecting) > (cut.ended - cut.started) - 6
    return history, reconnecting


def _assert_survived(
    cluster: Cluster, api, vm_id: str, migration_id: str, cut: Cut, ticks: TickWatcher, seen, tmp_path: Path
) -> None:
    dest = list(cluster.nodes)[1]
    url = f"/api/v1/migrations/{migration_id}/"
    _history, reconnecting = _completed_through(api, migration_id, cut, seen)
    # The guest ran on the source throughout the cut: a tick (every 100 ms) in every second of it.
    during = [at for _, at in ticks.ticks if cut.started <= at <= cut.ended]
    gaps = [
        later - earlier for earlier, later in zip([cut.started, *during], [*during, cut.ended], strict=True)
    ]
    assert max(gaps) < 1.0, f"the source guest stopped ticking for {max(gaps):.1f} s during the cut"
    ticks.stop_event.set()
    wait_for(lambda: "memory_check" in Migration.objects.get(pk=migration_id).stats, 30, "the memory check")
    assert Migration.objects.get(pk=migration_id).stats["memory_check"] == "match"
    vm = VM.objects.get(pk=vm_id)
    assert vm.node.name == dest and vm.state == "running"
    _assert_identical(tmp_path / "before.qcow2", disk_path(cluster, dest, vm_id))
    print(
        f"cut {cut.ended - cut.started:.1f} s; outage seen up to "
        f"{max(body['outage_seconds'] for body in reconnecting):.1f} s; "
        f"migration {api.get(url).json()['total_seconds']} s"
    )


@pytest.mark.parametrize(("phase", "seconds"), [("disk", 10), ("memory", 60)])
def test_a_cut_is_survived(
    cluster: Cluster,
    lab: NetLab,
    api,
    slow_dirty_image: Image,
    tmp_path: Path,
    phase: str,
    seconds: float,
):
    vm_id, migration_id, cut, ticks, seen = _cut_during(
        cluster, lab, api, slow_dirty_image, tmp_path, phase=phase, seconds=seconds
    )
    _assert_survived(cluster, api, vm_id, migration_id, cut, ticks, seen, tmp_path)


@pytest.mark.parametrize("cluster_extra_env", [8], indirect=True)
def test_a_cut_longer_than_the_limit_fails_with_the_reason_and_the_vm_stays_on_its_source(
    cluster: Cluster,
    lab: NetLab,
    api,
    slow_dirty_image: Image,
    tmp_path: Path,
):
    source, _ = list(cluster.nodes)
    vm_id, migration_id, _cut, ticks, _seen = _cut_during(
        cluster, lab, api, slow_dirty_image, tmp_path, phase="memory", seconds=25
    )
    ticks.stop_event.set()
    url = f"/api/v1/migrations/{migration_id}/"
    wait_for(lambda: api.get(url).json()["status"] in ("completed", "failed", "cancelled"), 120, "the end")
    migration = Migration.objects.get(pk=migration_id)
    assert migration.status == "failed", migration.status
    assert "down for" in migration.error and "above the limit of 8 s" in migration.error, migration.error
    wait_for(lambda: VM.objects.get(pk=vm_id).state == "running", 60, "the VM to run again")
    assert VM.objects.get(pk=vm_id).node.name == source
    wait_for(
        lambda: _qemu_run_dirs(vm_id) == [_run_dir(cluster, source, vm_id)], 30, "one QEMU, on the source"
    )


COLD_MBPS = 16  # the cold migration's DWCP bandwidth limit: 24 MiB of data take ~12 s, cut in the middle


def _cold_cut(
    cluster: Cluster, net: NetLab, api, tmp_path: Path, *, seconds: float
) -> tuple[str, str, Cut, list[dict[str, Any]]]:
    """Cold-migrate a stopped VM holding random data; cut the link for ``seconds`` once its disk is
    on its way. Returns the VM, the migration, the cut and the migration as the API showed it meanwhile."""
    source, dest = list(cluster.nodes)
    vm_id, _ = _stopped_with_data(cluster, api, f"cold-cut-{int(seconds)}", source, tmp_path)
    shutil.copyfile(disk_path(cluster, source, vm_id), tmp_path / "before.qcow2")  # stopped: a plain copy
    _shape(net, LINK)
    body = {"dest_node": dest, "mode": "cold", "bandwidth_limit_mbps": COLD_MBPS}
    response = api.post(f"/api/v1/vms/{vm_id}/migrate/", body, format="json")
    assert response.status_code == 202, response.json()
    migration_id = str(response.json()["id"])
    url = f"/api/v1/migrations/{migration_id}/"
    wait_for(lambda: api.get(url).json()["percent"] > 2, 120, "the disk on its way", interval=0.1)
    seen: list[dict[str, Any]] = []
    with Cut(net) as cut:
        while time.monotonic() < cut.started + seconds:
            seen.append(api.get(url).json())
            assert _qemu_run_dirs(vm_id) == [], "a QEMU runs the stopped VM during the cut"
            time.sleep(0.5)
    return vm_id, migration_id, cut, seen


@pytest.mark.parametrize("seconds", [10, 60])
def test_a_cold_migration_survives_a_cut_in_the_same_transfer(
    cluster: Cluster, lab: NetLab, api, guest_image: Image, tmp_path: Path, seconds: float
):
    source, dest = list(cluster.nodes)
    vm_id, migration_id, cut, seen = _cold_cut(cluster, lab, api, tmp_path, seconds=seconds)
    url = f"/api/v1/migrations/{migration_id}/"
    history, reconnecting = _completed_through(api, migration_id, cut, seen)
    vm = VM.objects.get(pk=vm_id)
    assert vm.node.name == dest and vm.state == "stopped"
    assert _qemu_run_dirs(vm_id) == []
    _assert_identical(tmp_path / "before.qcow2", disk_path(cluster, dest, vm_id))
    wait_for(lambda: not disk_path(cluster, source, vm_id).exists(), 30, "the source copy's removal")
    detail = next(detail for actor, detail in history if "disk sent and verified" in detail)
    print(
        f"cold, cut {cut.ended - cut.started:.1f} s; outage seen up to "
        f"{max(body['outage_seconds'] for body in reconnecting):.1f} s; {detail}; "
        f"migration {api.get(url).json()['total_seconds']} s"
    )


@pytest.mark.parametrize("cluster_extra_env", [8], indirect=True)
def test_a_cold_migration_cut_longer_than_the_limit_fails_cleanly(
    cluster: Cluster, lab: NetLab, api, guest_image: Image, tmp_path: Path
):
    source, dest = list(cluster.nodes)
    vm_id, migration_id, _cut, _seen = _cold_cut(cluster, lab, api, tmp_path, seconds=25)
    url = f"/api/v1/migrations/{migration_id}/"
    wait_for(lambda: api.get(url).json()["status"] in ("completed", "failed", "cancelled"), 60, "the end")
    migration = Migration.objects.get(pk=migration_id)
    assert migration.status == "failed", migration.status
    assert "down for" in migration.error and "above the limit of 8 s" in migration.error, migration.error
    vm = VM.objects.get(pk=vm_id)
    assert vm.node.name == source and vm.state == "stopped"
    assert _qemu_run_dirs(vm_id) == []
    assert disk_path(cluster, source, vm_id).exists()
    # The destination keeps nothing: its abort removed the partial file, and the DWCP session given up
    # after the limit (+5 s, long past by the end of the cut) wrote no journal for it.
    wait_for(
        lambda: not list((cluster.data_dirs[dest] / "disks").glob(f"*{vm_id}*")),
        30,
        "the destination's partial files to go",
    )
