"""``make bench-migration``: NovaCron live migration against QEMU's native migration, side by side.

Two node workers run in network namespaces joined by a veth link, in turn shaped with ``tc tbf`` (1 Gbit,
100 Mbit) and unshaped (no limit: what the machine moves); a private Redis on the host serves them and
the control worker. Per link it migrates a 1 GiB test guest that holds and keeps rewriting RAM
(``dirty_mb``/``dirty_rate_mb``) and has data on its disk, through the product's own path (API service
-> control worker -> node workers -> DWCP), with a NIC on a provider network whose LAN a client
namespace shares with both nodes (a ping every 10 ms and one TCP connection to the guest's counter
follow each migration: the network outage a user sees, beside the guest's pause), then the same guest
with QEMU alone over plain TCP on the same link (NBD disk mirror + ``migrate``): defaults (QEMU's
32 MiB/s cap), cap lifted, multifd x4 uncompressed, with zstd and with zlib, and cap lifted +
auto-converge. Each guest pause is split into QEMU's last pass and the switch (``table.pause_parts``).
It prints the table (``bench/migration/table.py``: medians, ranges, ratios to the best QEMU-alone
configuration and the issue's targets) and writes JSON under ``bench/results/``. Needs root, QEMU and
the local PostgreSQL.

Then (``--guests`` has ``debian``, the default) a Debian 12 guest (``make image-debian``), imported into
the store as ``debian-12`` and fetched to both nodes, created through the product with user data whose
runcmd starts a workload writing files with fsync; once cloud-init has finished and the workload has
written a few files, it is live-migrated back and forth (``--debian-runs`` per link), then the same image
(a fresh overlay on the same base file on each side) and the same seed ISO with QEMU alone: default,
multifd x4 and cap lifted + auto-converge. The Debian guest has no NIC.

For each NovaCron run it also records the ETA the source's forecast gave at 25, 50 and 75 % of the run's
wall time against the time that really remained (``bench/migration/eta.py``) and prints the error
distribution (median and largest absolute, in percent; ``--help`` tells how it is measured).

    python -m bench.migration.run [--runs 5] [--native-runs N] [--links 1gbit,100mbit,unshaped]
                                  [--memory-mb 1024] [--dirty-mb 256]
                                  [--guests testguest,debian] [--debian-runs 3] [--debian-memory-mb 512]
"""

import argparse
import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.migration.eta import EtaRecorder, errors, given
from bench.migration.netns import PREFIX, Topology, shape, two_hosts
from bench.migration.outage import Probe
from bench.migration.table import Section, link_rate, links, pause_parts, report

ROOT = Path(__file__).resolve().parents[2]
DB_NAME = "novacron_bench_migration"
SECRET = "bench-dwcp-secret"
MiB = 1 << 20
# A QEMU-only migration still short of its switch-over after this long is given up and reported so
# (about 9x NovaCron's time over 100 Mbit/s; over that link QEMU alone may never converge on this guest).
NATIVE_TIMEOUT_SECONDS = 120
LAN_PREFIX = "10.231.9"  # the provider network the client namespace shares with both nodes
DEBIAN_BASE = ROOT / "var" / "images" / "debian-12" / "debian-12.qcow2"  # `make image-debian`
DEBIAN_DISK_GB = 3  # the image's virtual size
DEBIAN_BOOT_TIMEOUT = 900  # create to cloud-init's final line and the workload's first files, under TCG
CLOUD_INIT_FINISHED = re.compile(r"Cloud-init v\. \S+ finished at")
WRITER_COUNT = re.compile(r"bench-writer (\d+) files")
# After a migration the workload says a new count within ~5 files' time; this long without one: stuck.
WORKLOAD_TIMEOUT = 60
# QEMU alone: how each variant sets the source (and the destination, for multifd).
NATIVE_VARIANTS: dict[str, dict[str, Any]] = {
    "default": {"lift": False, "multifd": 0},
    "cap lifted": {"lift": True, "multifd": 0},
    "multifd x4": {"lift": True, "multifd": 4},
    # QEMU's strongest: each multifd channel compresses its pages (level 1, QEMU's default for both).
    "multifd x4 + zstd": {"lift": True, "multifd": 4, "compression": "zstd"},
    "multifd x4 + zlib": {"lift": True, "multifd": 4, "compression": "zlib"},
    # NovaCron turns auto-converge on; this is QEMU with the same help, for a like-for-like ratio.
    "cap lifted + auto-converge": {"lift": True, "multifd": 0, "auto_converge": True},
}
# The Debian guest's QEMU-only variants: its boot costs a minute or more, so the runs are kept few.
DEBIAN_VARIANTS = ("default", "multifd x4", "cap lifted + auto-converge")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")


def link_bytes(topology: Topology) -> int:
    """Bytes sent by both ends of the A<->B link so far."""
    total = 0
    for ns in (topology.ns_a, topology.ns_b):
        out = subprocess.run(
            ["ip", "netns", "exec", ns, "cat", "/sys/class/net/eth-peer/statistics/tx_bytes"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        total += int(out.strip())
    return total


@contextmanager
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for process in started:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in started:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def spawn(started: list[subprocess.Popen[bytes]], command: list[str], env: dict[str, str], log: Path) -> None:
    with log.open("ab") as out:
        started.append(
            subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        )


# --- NovaCron through the product ---------------------------------------------------------------------


def live_migration(vm_id: Any, user: Any, there: Any, topology: Topology) -> dict[str, Any]:
    """One live migration of the VM to node ``there`` through the product's service; its figures
    (``link_bytes`` counts from the request to the source's final report)."""
    from apps.migrations.choices import MigrationMode
    from apps.migrations.models import Migration
    from apps.migrations.serializers import MigrationSerializer
    from apps.migrations.services import TERMINAL_STATUSES, migration_request
    from apps.vms.models import VM

    before = link_bytes(topology)
    recorder = EtaRecorder(os.environ["REDIS_URL"])
    requested_at = time.time()
    migration = migration_request(
        vm=VM.objects.get(pk=vm_id), requested_by=user, mode=MigrationMode.LIVE, dest_node=there
    )
    wait_for(
        lambda: Migration.objects.get(pk=migration.pk).status in TERMINAL_STATUSES,
        1800, "the migration", interval=0.5,
    )  # fmt: skip
    # The source's final report (QEMU's figures) may land just after the destination's switch.
    wait_for(
        lambda: "qemu_downtime_ms" in Migration.objects.get(pk=migration.pk).stats
        or Migration.objects.get(pk=migration.pk).status != "completed",
        30, "the source's final report",
    )  # fmt: skip
    migration.refresh_from_db()
    if migration.status != "completed" or migration.finished_at is None:
        raise RuntimeError(f"NovaCron migration {migration.pk} {migration.status}: {migration.error}")
    snapshots = recorder.stop(str(migration.pk))
    eta_given = given(snapshots, requested_at)
    eta_errors = errors(eta_given, migration.finished_at.timestamp() - requested_at)
    data = MigrationSerializer(migration).data
    stats = migration.stats
    parts = pause_parts(
        stats.get("source_stopped_at"), stats.get("source_completed_at"), stats.get("dest_resumed_at")
    )
    return {
        "id": str(migration.pk),
        "total_seconds": data["total_seconds"],
        "downtime_ms": data["downtime_ms"],
        "last_pass_ms": parts["last_pass_ms"],
        "switch_ms": parts["switch_ms"],
        "qemu_downtime_ms": stats.get("qemu_downtime_ms"),
        "memory_check_ms": stats.get("memory_check_ms"),
        "link_bytes": link_bytes(topology) - before,
        "dwcp_wire_bytes": data["wire_bytes"],
        "converging": migration.stats.get("converging", "unknown"),
        "eta_error_pct": eta_errors,
        "eta_given": eta_given,  # (seconds since the request, ETA, phase) as the source published them
        "progress": snapshots,  # every snapshot the source published: the forecast's inputs, to replay
        "requested_at": requested_at,
        "finished_at": migration.finished_at.timestamp(),
        "load_average": os.getloadavg(),  # the machine's (1, 5, 15 min) as the run ended: a shared box
    }


def novacron_runs(
    args: argparse.Namespace, topology: Topology, workdir: Path
) -> dict[str, list[dict[str, Any]]]:
    from django.contrib.auth.models import User

    from apps.networks.services import network_create
    from apps.projects.services import personal_project
    from apps.vms.models import VM, Image, Node
    from apps.vms.services import VMRequest, vm_create, vm_delete

    user, _ = User.objects.get_or_create(username="bench", defaults={"is_staff": True})
    lan = network_create(
        project_id=personal_project(user).pk, name="bench-lan", cidr=f"{LAN_PREFIX}.0/24", shared=True,
        physical_network="lan",
    )  # fmt: skip
    subprocess.run(
        ["ip", "-n", topology.ns_client, "addr", "add", f"{LAN_PREFIX}.250/24", "dev", "lan"], check=True
    )
    base = Image.objects.get(name="testguest")
    image, _ = Image.objects.update_or_create(
        name="testguest-bench",
        defaults={
            "kind": base.kind, "format": base.format, "kernel_path": base.kernel_path,
            "initrd_path": base.initrd_path,
            "cmdline": f"{base.cmdline} dirty_mb={args.dirty_mb} dirty_rate_mb={args.dirty_rate_mb} dirty_data={args.dirty_data}",
        },
    )  # fmt: skip
    node_a = Node.objects.get(name="bench-a")
    node_b = Node.objects.get(name="bench-b")
    results: dict[str, list[dict[str, Any]]] = {}
    vm = vm_create(
        owner=user,
        project_id=personal_project(user).pk,
        request=VMRequest(
            name="mover",
            image=image,
            vcpus=1,
            memory_mb=args.memory_mb,
            disk_gb=2,
            node=node_a,
            networks=[lan.name],
        ),
    )
    wait_for(lambda: VM.objects.get(pk=vm.pk).state == "running", 120, "the VM to run")
    address = vm.nics.get().ipv4
    wait_for(
        lambda: subprocess.run(["ip", "netns", "exec", topology.ns_client, "ping", "-c", "1", "-W", "1", address],
                               capture_output=True, check=False).returncode == 0,
        300, "the guest to answer on the LAN",
    )  # fmt: skip
    guest_log = workdir / node_a.name / "run" / str(vm.pk) / "guest.log"
    # Filled once; from then on the guest keeps rewriting it, on whichever node it runs.
    wait_for(lambda: "dirty ready" in guest_log.read_text(errors="replace"), 600, "the guest's RAM load")
    here = node_a
    for link in args.links:
        shape(topology, link_rate(link))
        runs = results.setdefault(link, [])
        for index in range(args.runs):
            there = node_b if here == node_a else node_a
            before = link_bytes(topology)
            probe = Probe(topology.ns_client, address)
            time.sleep(1)  # the probe's connection is up and its pings answered before the move
            run = live_migration(vm.pk, user, there, topology)
            time.sleep(1)  # traffic goes on at the destination
            seen = probe.finish()
            if seen["tcp"]["closed"] or not seen["tcp"]["in_order"]:
                raise RuntimeError(
                    f"the client's TCP connection did not survive migration {run['id']}: {seen}"
                )
            run |= {
                "link_bytes": link_bytes(topology) - before,
                "network_outage_ms": seen["ping"]["longest_gap_ms"],
                "tcp_longest_gap_ms": seen["tcp"]["longest_gap_ms"],
                "pings_lost": seen["ping"]["sent"] - seen["ping"]["received"],
            }
            runs.append(run)
            shown = {key: value for key, value in run.items() if key not in ("eta_given", "progress")}
            print(f"  novacron {link} run {index + 1}: {shown}", flush=True)
            here = there
            time.sleep(2)  # the source's cleanup lands before the next run starts
    if args.cold:
        cold_runs(args, topology, workdir, VM.objects.get(pk=vm.pk), user, here, results)
    # The QEMU-only runs that follow get the machine without this guest, as the migrations above had.
    vm_delete(vm=VM.objects.get(pk=vm.pk))
    wait_for(lambda: VM.objects.get(pk=vm.pk).state == "deleted", 120, "the VM's deletion")
    return results


# --- the Debian guest -------------------------------------------------------------------------------------


def debian_user_data(args: argparse.Namespace) -> str:
    """cloud-config whose runcmd starts the workload as its own systemd unit (cloud-init finishes while
    it runs on): ``--debian-file-mb`` MiB of /dev/urandom written with fsync to one of four files in
    /var/tmp in turn, then ``--debian-pause`` seconds, for ever; so both the disk and the page cache keep
    getting dirty. It says on the serial console when it starts and every five files."""
    script = (
        f"echo bench-writer started > /dev/ttyS0; i=0; while :; do "
        f"dd if=/dev/urandom of=/var/tmp/bench-$((i % 4)) bs=1M count={args.debian_file_mb} conv=fsync status=none; "
        f'i=$((i + 1)); if [ $((i % 5)) -eq 0 ]; then echo "bench-writer $i files" > /dev/ttyS0; fi; '
        f"sleep {args.debian_pause:g}; done"
    )
    runcmd = [["systemd-run", "--unit=bench-writer", "/bin/sh", "-c", script]]
    return "#cloud-config\n" + json.dumps({"runcmd": runcmd}) + "\n"


def files_written(serial: Path) -> int:
    """The workload's latest count of files written, as its serial console lines say (0: none yet)."""
    text = serial.read_text(errors="replace") if serial.exists() else ""
    return max((int(count) for count in WRITER_COUNT.findall(text)), default=0)


def wait_for_boot(serial: Path) -> int:
    """Wait until the guest has booted (cloud-init's final line) and its workload has written a few files;
    the count."""
    wait_for(
        lambda: serial.exists() and CLOUD_INIT_FINISHED.search(serial.read_text(errors="replace")),
        DEBIAN_BOOT_TIMEOUT, f"cloud-init to finish ({serial})", interval=1,
    )  # fmt: skip
    return wait_for_files(serial, 4, DEBIAN_BOOT_TIMEOUT)


def wait_for_files(serial: Path, after: int, timeout: float) -> int:
    """Wait until the workload has said it wrote more than ``after`` files; the count."""
    return int(
        wait_for(lambda: files_written(serial) > after and files_written(serial), timeout,
                 f"more than {after} files from the workload ({serial})", interval=1)
    )  # fmt: skip


def workload_after(serial: Path, written: int) -> dict[str, Any]:
    """Whether the moved guest lives on: its workload writes more files at the destination (within
    ``WORKLOAD_TIMEOUT`` s); a guest that does not is kept in the results and flagged."""
    try:
        after: int | None = wait_for_files(serial, written, WORKLOAD_TIMEOUT)
    except TimeoutError:
        after = None
    return {
        "files_written_before": written,
        "files_written_after": after,
        "workload_went_on": after is not None,
    }


def debian_novacron_runs(
    args: argparse.Namespace, topology: Topology, workdir: Path
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """Live migrations of the Debian VM through the product (created from the store's ``debian-12`` with
    the workload's user data, no NIC), back and forth, ``--debian-runs`` per link; and its spec as its
    node wrote it (the QEMU-only runs build the same seed from it)."""
    from django.contrib.auth.models import User
    from django.core.management import call_command
    from django.db import transaction

    from apps.images import fetches
    from apps.images.models import NodeImage, NodeImageState
    from apps.projects.services import personal_project
    from apps.vms.models import VM, Image, Node
    from apps.vms.services import VMRequest, vm_create, vm_delete

    user, _ = User.objects.get_or_create(username="bench", defaults={"is_staff": True})
    call_command(
        "image_import", "debian-12", str(DEBIAN_BASE), format="qcow2", visibility="shared", os_type="linux",
        os_version="12", min_memory_mb=256, stdout=io.StringIO(),
    )  # fmt: skip
    image = Image.objects.get(name="debian-12")
    node_a = Node.objects.get(name="bench-a")
    node_b = Node.objects.get(name="bench-b")
    # Both nodes hold the image before anything is measured, as QEMU alone has its base file on both sides.
    shape(topology, None)  # the test guest's runs may have left the A<->B link shaped
    started = time.monotonic()
    for node in (node_a, node_b):
        with transaction.atomic():
            fetches.ensure(node, image)
    wait_for(
        lambda: NodeImage.objects.filter(image=image, state=NodeImageState.READY).count() == 2,
        600, "debian-12 on both nodes", interval=1,
    )  # fmt: skip
    print(f"  debian-12 fetched to both nodes by DWCP (unshaped link) in {time.monotonic() - started:.0f} s")
    vm = vm_create(
        owner=user,
        project_id=personal_project(user).pk,
        request=VMRequest(
            name="debian-mover",
            image=image,
            vcpus=1,
            memory_mb=args.debian_memory_mb,
            disk_gb=DEBIAN_DISK_GB,
            node=node_a,
            networks=[],
            hostname="bench-debian",
            user_data=debian_user_data(args),
        ),
    )
    created = time.monotonic()
    wait_for(lambda: VM.objects.get(pk=vm.pk).state == "running", 300, "the Debian VM to run")
    run_dir = workdir / node_a.name / "run" / str(vm.pk)
    written = wait_for_boot(run_dir / "serial.log")
    print(f"  debian booted and {written} files written {time.monotonic() - created:.0f} s after the create")
    spec = json.loads((run_dir / "spec.json").read_text())
    results: dict[str, list[dict[str, Any]]] = {}
    here = node_a
    for link in args.links:
        shape(topology, link_rate(link))
        for index in range(args.debian_runs):
            there = node_b if here == node_a else node_a
            written = files_written(workdir / here.name / "run" / str(vm.pk) / "serial.log")
            run = live_migration(vm.pk, user, there, topology)
            run |= workload_after(workdir / there.name / "run" / str(vm.pk) / "serial.log", written)
            results.setdefault(link, []).append(run)
            print(f"  novacron debian {link} run {index + 1}: {run}", flush=True)
            here = there
            time.sleep(2)  # the source's cleanup lands before the next run starts
    vm_delete(vm=VM.objects.get(pk=vm.pk))
    wait_for(lambda: VM.objects.get(pk=vm.pk).state == "deleted", 120, "the Debian VM's deletion")
    return results, spec


def debian_native_runs(
    args: argparse.Namespace, topology: Topology, workdir: Path, spec_data: dict[str, Any]
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """QEMU alone with the same Debian guest: a fresh qcow2 overlay on the same base file on each side,
    the same seed ISO (built by `workers.qemu.seed` from the NovaCron VM's spec, so the same bytes) and
    user data; booted once in namespace A, then migrated back and forth, a fresh destination each time,
    ``--native-runs`` per variant and link."""
    from workers.qemu import QmpSession
    from workers.qemu.cmdline import seed_arguments
    from workers.qemu.layout import VmPaths
    from workers.qemu.qmp import EventLoopThread, QmpTimeout
    from workers.qemu.seed import write_seed
    from workers.qemu.spec import VmSpec

    spec = VmSpec.from_dict(spec_data)
    root = workdir / "debian-native"
    sides = {"a": (topology.ns_a, topology.a_link), "b": (topology.ns_b, topology.b_link)}
    loop = EventLoopThread()
    sessions: list[Any] = []  # the QEMUs still running

    def stop(session: Any) -> None:
        _quit(session)
        sessions.remove(session)

    def start(side: str, generation: int, incoming: bool) -> tuple[Path, Any]:
        run = root / f"{generation}-{side}"
        run.mkdir(parents=True)
        paths = VmPaths(run / "disk.qcow2", run)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(DEBIAN_BASE),
                        str(paths.disk)], check=True)  # fmt: skip
        write_seed(spec, paths.seed)
        extra = [*seed_arguments(paths), *(["-S", "-incoming", "defer"] if incoming else [])]
        subprocess.run(_qemu(sides[side][0], spec.memory_mb, paths.disk, run, extra), check=True)
        session = QmpSession(run / "qmp.sock", loop, timeout=30)
        sessions.append(session)
        return run, session

    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    try:
        side, generation, broken = "a", 0, False
        run, current = start(side, generation, incoming=False)
        created = time.monotonic()
        written = wait_for_boot(run / "serial.log")
        print(
            f"  debian booted and {written} files written {time.monotonic() - created:.0f} s after the start"
        )
        for link in args.links:
            shape(topology, link_rate(link))
            for variant in DEBIAN_VARIANTS:
                for index in range(args.native_runs):
                    if broken:
                        # This run needs a live guest: a fresh one, booted where the last one stopped.
                        stop(current)
                        generation += 1
                        run, current = start(side, generation, incoming=False)
                        wait_for_boot(run / "serial.log")
                        broken = False
                    other = "b" if side == "a" else "a"
                    generation += 1
                    dst_run, dst = start(other, generation, incoming=True)
                    written = files_written(run / "serial.log")
                    result = _native_migrate(
                        topology, current, dst, sides[other][1], NATIVE_VARIANTS[variant], QmpTimeout
                    )
                    if result["completed"]:
                        stop(current)
                        current, run, side = dst, dst_run, other
                        result |= workload_after(run / "serial.log", written)
                    else:
                        stop(dst)
                    results.setdefault(link, {}).setdefault(variant, []).append(result)
                    print(f"  qemu debian {variant} {link} run {index + 1}: {result}", flush=True)
                    broken = not result.get("workload_went_on", True)
    finally:
        for session in list(sessions):
            stop(session)
        loop.close()
    return results


def _fill_disk(disk: Path, workdir: Path, megabytes: int) -> None:
    """Give the stopped VM's disk realistic content: half random, half program text (the guest's kernel
    and initramfs repeated), the rest of the 2 GiB unallocated."""
    from workers.guest.boot import GuestImage

    guest = GuestImage.from_manifest(ROOT / "var" / "images" / "testguest" / "manifest.json")
    text = guest.kernel.read_bytes() + guest.initrd.read_bytes()
    raw = workdir / "cold-fill.raw"
    half = megabytes * MiB // 2
    with raw.open("wb") as out:
        out.write(os.urandom(half))
        written = 0
        while written < half:
            piece = text[: half - written]
            out.write(piece)
            written += len(piece)
        out.truncate(2 * 1024 * MiB)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(disk)], check=True)
    raw.unlink()


def cold_runs(
    args: argparse.Namespace,
    topology: Topology,
    workdir: Path,
    vm: Any,
    user: Any,
    here: Any,
    results: dict[str, list[dict[str, Any]]],
) -> None:
    """Cold migration of the stopped VM per link, beside a plain DWCP file transfer of the same disk.

    The same qcow2 file goes through ``python -m workers.dwcp send`` from the node holding it to the
    other node's DWCP server, on the same link: the cold migration should move the disk at that rate
    (its extra is stopping, defining and confirming on both sides).
    """
    from apps.migrations.choices import MigrationMode
    from apps.migrations.models import Migration
    from apps.migrations.serializers import MigrationSerializer
    from apps.migrations.services import TERMINAL_STATUSES, migration_request
    from apps.vms.choices import VMAction
    from apps.vms.models import VM, Node
    from apps.vms.services import vm_request_action

    vm_request_action(vm=vm, action=VMAction.STOP)
    wait_for(lambda: VM.objects.get(pk=vm.pk).state == "stopped", 120, "the VM to stop")
    disk = workdir / here.name / "disks" / f"{vm.pk}.qcow2"
    _fill_disk(disk, workdir, args.cold_mb)
    nodes = {
        "bench-a": (topology.ns_a, topology.a_link),
        "bench-b": (topology.ns_b, topology.b_link),
    }
    for link in args.links:
        shape(topology, link_rate(link))
        there = Node.objects.exclude(pk=here.pk).get(name__in=list(nodes))
        disk = workdir / here.name / "disks" / f"{vm.pk}.qcow2"
        ns, _ = nodes[here.name]
        _, there_address = nodes[there.name]
        sent = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "workers.dwcp", "send", str(disk),
             "--to", f"{there_address}:7400", "--name", f"bench-cold-{link}.qcow2",
             "--node-name", here.name, "--dest-node", there.name],
            cwd=ROOT, env=os.environ | {"DWCP_SECRET": SECRET}, capture_output=True, text=True, check=True,
        )  # fmt: skip
        plain = json.loads(sent.stdout.strip().splitlines()[-1])
        (workdir / there.name / f"bench-cold-{link}.qcow2").unlink(missing_ok=True)
        before = link_bytes(topology)
        migration = migration_request(
            vm=VM.objects.get(pk=vm.pk), requested_by=user, mode=MigrationMode.COLD, dest_node=there
        )
        wait_for(
            lambda: Migration.objects.get(pk=migration.pk).status in TERMINAL_STATUSES,  # noqa: B023
            1800, "the cold migration", interval=0.5,
        )  # fmt: skip
        migration.refresh_from_db()
        if migration.status != "completed":
            raise RuntimeError(f"cold migration {migration.pk} {migration.status}: {migration.error}")
        data = MigrationSerializer(migration).data
        run = {
            "total_seconds": data["total_seconds"],
            "disk_bytes": plain["raw_bytes"],
            "link_bytes": link_bytes(topology) - before,
            "dwcp_wire_bytes": data["wire_bytes"],
            "dwcp_send_seconds": plain["seconds"],
            "dwcp_send_wire_bytes": plain["wire_bytes"],
        }
        results.setdefault(f"{link} cold", []).append(run)
        print(f"  novacron cold {link}: {run}", flush=True)
        here = there
        time.sleep(2)  # the source's cleanup lands before the next run starts


# --- QEMU alone -----------------------------------------------------------------------------------------


def native_runs(
    args: argparse.Namespace, topology: Topology, workdir: Path
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    from workers.guest.boot import GuestImage
    from workers.qemu import QmpSession
    from workers.qemu.qmp import EventLoopThread, QmpTimeout

    guest = GuestImage.from_manifest(ROOT / "var" / "images" / "testguest" / "manifest.json")
    cmdline = f"{guest.cmdline} dirty_mb={args.dirty_mb} dirty_rate_mb={args.dirty_rate_mb} dirty_data={args.dirty_data}"
    loop = EventLoopThread()
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    try:
        for link in args.links:
            shape(topology, link_rate(link))
            for variant, options in NATIVE_VARIANTS.items():
                for index in range(args.native_runs):
                    run = _native_once(
                        topology,
                        workdir / "native",
                        guest,
                        cmdline,
                        args,
                        options,
                        loop,
                        QmpSession,
                        QmpTimeout,
                    )
                    results.setdefault(link, {}).setdefault(variant, []).append(run)
                    print(f"  qemu {variant} {link} run {index + 1}: {run}", flush=True)
    finally:
        loop.close()
    return results


def _qemu(ns: str, memory_mb: int, disk: Path, run: Path, extra: list[str]) -> list[str]:
    """QEMU in namespace ``ns``, the disk and the two serial ports (console, guest channel) as NovaCron's
    nodes attach them (``disk0``, virtio-blk; ``serial.log``, ``guest.log``); ``extra`` says what it
    boots (a kernel, or the disk with a seed CD) and whether it waits for a migration."""
    return [
        "ip", "netns", "exec", ns, "qemu-system-x86_64", "-machine", "q35,accel=tcg", "-cpu", "max",
        "-m", str(memory_mb), "-nodefaults", "-no-user-config", "-display", "none", "-nic", "none",
        "-daemonize", "-pidfile", str(run / "qemu.pid"),
        "-qmp", f"unix:{run / 'qmp.sock'},server=on,wait=off",
        "-chardev", f"file,id=serial0,path={run / 'serial.log'}", "-serial", "chardev:serial0",
        "-chardev", f"file,id=guest0,path={run / 'guest.log'}", "-serial", "chardev:guest0",
        "-blockdev", f"driver=file,filename={disk},node-name=file0",
        "-blockdev", "driver=qcow2,file=file0,node-name=disk0",
        "-device", "virtio-blk-pci,drive=disk0", *extra,
    ]  # fmt: skip


def _quit(session: Any) -> None:
    with contextlib.suppress(Exception):  # the process may be gone already
        session.execute("quit")
    session.close()


def _native_once(
    topology: Topology,
    workdir: Path,
    guest: Any,
    cmdline: str,
    args: argparse.Namespace,
    options: dict[str, Any],
    loop: Any,
    session_class: Any,
    timeout_error: type[Exception],
) -> dict[str, Any]:
    """The test guest booted in A and B (incoming), its RAM load waited for, one migration A -> B."""
    src_run, dst_run = workdir / "src", workdir / "dst"
    for run in (src_run, dst_run):
        subprocess.run(["rm", "-rf", str(run)], check=True)
        run.mkdir(parents=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(run / "disk.qcow2"), "2G"], check=True)
    kernel = ["-kernel", str(guest.kernel), "-initrd", str(guest.initrd), "-append", cmdline]
    subprocess.run(_qemu(topology.ns_a, args.memory_mb, src_run / "disk.qcow2", src_run, kernel), check=True)
    subprocess.run(
        _qemu(
            topology.ns_b,
            args.memory_mb,
            dst_run / "disk.qcow2",
            dst_run,
            [*kernel, "-S", "-incoming", "defer"],
        ),
        check=True,
    )
    src = session_class(src_run / "qmp.sock", loop, timeout=30)
    dst = session_class(dst_run / "qmp.sock", loop, timeout=30)
    try:
        wait_for(
            lambda: "dirty ready" in (src_run / "guest.log").read_text(errors="replace"), 300, "the RAM load"
        )
        return _native_migrate(topology, src, dst, topology.b_link, options, timeout_error)
    finally:
        for session in (src, dst):
            _quit(session)


def _native_migrate(
    topology: Topology,
    src: Any,
    dst: Any,
    dst_address: str,
    options: dict[str, Any],
    timeout_error: type[Exception],
) -> dict[str, Any]:
    """One QEMU-only live migration from the running ``src`` to the incoming ``dst`` (listening on
    ``dst_address``): ``disk0``'s top layer mirrored to an NBD export of the destination's, then
    ``migrate``, switched over when the mirror is cancelled (in sync), the destination resumed. A run
    short of its switch-over after ``NATIVE_TIMEOUT_SECONDS`` is cancelled: the source runs on as before.
    Every capability and parameter is set, so a QEMU that served an earlier variant keeps nothing of it.
    A multifd compression this QEMU refuses is returned as such (``unsupported``: QEMU's message)."""
    from workers.qemu.errors import QmpCommandError

    nbd_port, mig_port = free_port(), free_port()
    caps = [
        {"capability": "events", "state": True},
        {"capability": "multifd", "state": bool(options["multifd"])},
    ]
    dst.execute("migrate-set-capabilities", {"capabilities": caps})
    multifd: dict[str, Any] = {}
    if options["multifd"]:
        # Both ends must agree on the compression; "none" resets what an earlier variant set.
        multifd = {
            "multifd-channels": options["multifd"],
            "multifd-compression": options.get("compression", "none"),
        }
        try:
            dst.execute("migrate-set-parameters", multifd)
        except QmpCommandError as exc:
            return {"completed": False, "unsupported": str(exc)}
    dst.execute(
        "nbd-server-start", {"addr": {"type": "inet", "data": {"host": dst_address, "port": str(nbd_port)}}}
    )
    dst.execute(
        "block-export-add",
        {"type": "nbd", "id": "exp", "node-name": "disk0", "name": "disk0", "writable": True},
    )
    dst.execute("migrate-incoming", {"uri": f"tcp:{dst_address}:{mig_port}"})
    source_caps = [
        *caps,
        {"capability": "pause-before-switchover", "state": True},
        {"capability": "auto-converge", "state": bool(options.get("auto_converge"))},
    ]
    src.execute("migrate-set-capabilities", {"capabilities": source_caps})
    # 32 MiB/s is QEMU's own default cap.
    params: dict[str, Any] = {
        "downtime-limit": 100,
        "max-bandwidth": 1 << 40 if options["lift"] else 32 * MiB,
    }
    src.execute("migrate-set-parameters", params | multifd)
    before = link_bytes(topology)
    started = time.monotonic()
    mark = src.event_mark()
    src.execute("blockdev-add", {"driver": "nbd", "node-name": "tgt", "export": "disk0",
                                 "server": {"type": "inet", "host": dst_address, "port": str(nbd_port)}})  # fmt: skip
    src.execute("blockdev-mirror", {"job-id": "m", "device": "disk0", "target": "tgt", "sync": "top"})
    src.wait_event("BLOCK_JOB_READY", timeout=1800, after=mark)
    mark = src.event_mark()
    src.execute("migrate", {"uri": f"tcp:{dst_address}:{mig_port}"})
    try:
        src.wait_event(
            "MIGRATION",
            timeout=NATIVE_TIMEOUT_SECONDS,
            after=mark,
            match=lambda e: e.data.get("status") in ("pre-switchover", "failed"),
        )
    except timeout_error:
        src.execute("migrate_cancel")
        cancel = src.event_mark()
        src.execute("block-job-cancel", {"device": "m", "force": True})
        src.wait_event("BLOCK_JOB_CANCELLED", timeout=60, after=cancel)
        src.execute("blockdev-del", {"node-name": "tgt"})
        return {"completed": False, "gave_up_after_seconds": NATIVE_TIMEOUT_SECONDS}
    stopped = next(e for e in src.events_since(mark) if e.name == "STOP")
    cancel = src.event_mark()
    src.execute("block-job-cancel", {"device": "m"})
    src.wait_event("BLOCK_JOB_COMPLETED", timeout=60, after=cancel)
    dst_mark = dst.event_mark()
    src.execute("migrate-continue", {"state": "pre-switchover"})
    dst.wait_event(
        "MIGRATION", timeout=120, after=dst_mark, match=lambda e: e.data.get("status") == "completed"
    )
    completed = src.wait_event(
        "MIGRATION", timeout=10, after=mark, match=lambda e: e.data.get("status") == "completed"
    )
    resume_mark = dst.event_mark()
    dst.execute("cont")  # as NovaCron does: resume first, then drop the export
    resumed = dst.wait_event("RESUME", timeout=10, after=resume_mark)
    dst.execute("block-export-del", {"id": "exp", "mode": "hard"})
    total = time.monotonic() - started
    info = src.execute("query-migrate")
    parts = pause_parts(stopped.timestamp, completed.timestamp, resumed.timestamp)
    return {
        "completed": True,
        "total_seconds": round(total, 3),
        "downtime_ms": parts["pause_ms"],
        "last_pass_ms": parts["last_pass_ms"],
        "switch_ms": parts["switch_ms"],
        "qemu_downtime_ms": info.get("downtime"),
        "link_bytes": link_bytes(topology) - before,
    }


# --- main ----------------------------------------------------------------------------------------------


def namespaces(text: str) -> str:
    """``PREFIX:OCTET`` (``--netns``): a topology of its own, so that two benches can run at once."""
    prefix, _, octet = text.partition(":")
    if not prefix or len(prefix) > 12 or not octet.isdigit() or not 1 <= int(octet) <= 254:
        raise argparse.ArgumentTypeError(f"expected PREFIX:OCTET (prefix up to 12 characters), got {text!r}")
    return text


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="ETA columns (NovaCron rows): at 25, 50 and 75 % of each run's wall time (request to completion)"
        " the last ETA the source's forecast had published is compared with the time that really remained;"
        " the error is (ETA - true) / true in percent (positive: pessimistic). The table shows the median and the"
        " largest absolute error over the runs and the three marks, and a second table each mark on its own;"
        " the JSON keeps each run's errors (eta_error_pct).",
    )
    parser.add_argument(
        "--runs", type=int, default=5, help="NovaCron migrations per link (medians over them)"
    )
    parser.add_argument(
        "--native-runs", type=int, default=None,
        help="QEMU-only migrations per configuration and link (default: as many as --runs)",
    )  # fmt: skip
    parser.add_argument(
        "--links", default="1gbit,100mbit,unshaped", type=links,
        help="tc rates of the A<->B link, in turn, and/or 'unshaped' (no limit)",
    )  # fmt: skip
    parser.add_argument(
        "--cold", action=argparse.BooleanOptionalAction, default=True, help="cold migration runs too"
    )
    parser.add_argument("--cold-mb", type=int, default=256, help="data written to the disk before them")
    parser.add_argument("--memory-mb", type=int, default=1024)
    parser.add_argument("--dirty-mb", type=int, default=256)
    parser.add_argument("--dirty-rate-mb", type=int, default=4)
    parser.add_argument(
        "--dirty-data", choices=("binaries", "random"), default="binaries",
        help="what the guest's RAM holds: program text and data (realistic) or random bytes (incompressible)",
    )  # fmt: skip
    parser.add_argument(
        "--guests", default="testguest,debian", type=lambda text: text.split(","),
        help="which guests: testguest (RAM load, cold runs) and/or debian (Debian 12 writing files)",
    )  # fmt: skip
    parser.add_argument("--debian-runs", type=int, default=3, help="NovaCron migrations of Debian per link")
    parser.add_argument("--debian-memory-mb", type=int, default=512)
    parser.add_argument("--debian-file-mb", type=int, default=8, help="size of each file the workload writes")
    parser.add_argument("--debian-pause", type=float, default=2.0, help="seconds between two files")
    parser.add_argument(
        "--database",
        default=DB_NAME,
        help="PostgreSQL database the bench creates and drops (one per concurrent bench)",
    )
    parser.add_argument(
        "--netns", default=f"{PREFIX}:231", type=namespaces,
        help="PREFIX:OCTET of the bench's namespaces and 10.OCTET.0.0/23 addresses (one per concurrent bench)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.native_runs is None:
        args.native_runs = args.runs
    if args.runs < 1 or args.native_runs < 0:
        parser.error("--runs must be at least 1 and --native-runs at least 0")
    if unknown := set(args.guests) - {"testguest", "debian"}:
        parser.error(f"unknown guest(s): {', '.join(sorted(unknown))}")
    if os.geteuid() != 0:
        print("bench-migration needs root (network namespaces)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="ncbm-"))
    redis_port = free_port()
    prefix, _, octet = args.netns.partition(":")
    with two_hosts(Topology.of(prefix, int(octet))) as topology, processes() as started:
        spawn(started, ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", topology.host_a, topology.host_b,
                        "--save", "", "--appendonly", "no", "--protected-mode", "no"], dict(os.environ), workdir / "redis.log")  # fmt: skip
        database_url = f"postgres://postgres@127.0.0.1:5432/{args.database}"
        subprocess.run(
            ["dropdb", "-U", "postgres", "-h", "127.0.0.1", "--if-exists", args.database], check=True
        )
        subprocess.run(["createdb", "-U", "postgres", "-h", "127.0.0.1", args.database], check=True)
        env = dict(os.environ) | {
            "DJANGO_SETTINGS_MODULE": "novacron.settings.main", "DATABASE_URL": database_url,
            "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0", "SECRET_KEY": "bench", "DWCP_SECRET": SECRET,
            "NOVACRON_ADMIN_PASSWORD": "bench-admin-password", "CPU_ALLOCATION_RATIO": "16", "LOG_LEVEL": "WARNING",
            "MIGRATION_STALL_TIMEOUT": "600",
            "IMAGE_STORE_DIR": str(workdir / "store"),
        }  # fmt: skip
        os.environ.update(env)
        subprocess.run([sys.executable, "manage.py", "migrate", "-v", "0"], cwd=ROOT, env=env, check=True)
        subprocess.run(
            [sys.executable, "manage.py", "bootstrap"], cwd=ROOT, env=env, check=True, capture_output=True
        )
        spawn(started, [sys.executable, "-m", "celery", "-A", "novacron", "worker", "-B", "-Q", "control", "--pool",
                        "threads", "-c", "4", "--schedule", str(workdir / "beat")], env, workdir / "control.log")  # fmt: skip
        for name, ns, redis_host, dwcp, extra in (
            ("bench-a", topology.ns_a, topology.host_a, topology.a_link, ["--physical-networks", "lan=lan0"]),
            ("bench-b", topology.ns_b, topology.host_b, topology.b_link, ["--physical-networks", "lan=lan0"]),
        ):
            node_env = env | {"REDIS_URL": f"redis://{redis_host}:{redis_port}/0"}
            spawn(started, ["ip", "netns", "exec", ns, sys.executable, "-m", "workers.node", "--name", name,
                            "--data-dir", str(workdir / name), "--dwcp-listen", f"{dwcp}:7400", "--accelerator", "tcg",
                            *extra], node_env, workdir / f"{name}.log")  # fmt: skip
        import django

        django.setup()
        from apps.vms.models import Node

        wait_for(lambda: Node.objects.filter(name__in=["bench-a", "bench-b"]).count() == 2, 60, "the nodes")
        sections: list[Section] = []
        if "testguest" in args.guests:
            print(f"NovaCron live migration ({args.runs} runs per link; logs in {workdir}):", flush=True)
            ours = novacron_runs(args, topology, workdir)
            print("QEMU alone, same guest, same link:", flush=True)
            sections.append(("testguest", ours, native_runs(args, topology, workdir)))
        if "debian" in args.guests:
            print(
                f"Debian: NovaCron live migration ({args.debian_runs} runs per link; logs in {workdir}):",
                flush=True,
            )
            debian, spec = debian_novacron_runs(args, topology, workdir)
            print("Debian: QEMU alone, same image, seed and link:", flush=True)
            sections.append(("debian", debian, debian_native_runs(args, topology, workdir, spec)))
    report(args, sections)
    from django.db import connections

    connections.close_all()
    # --force: this process's connection pool keeps its idle sessions open until it exits.
    subprocess.run(
        ["dropdb", "-U", "postgres", "-h", "127.0.0.1", "--if-exists", "--force", args.database], check=False
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
