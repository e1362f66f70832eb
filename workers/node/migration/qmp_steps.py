"""The QMP sequences of a live migration, both roles (the order measured on QEMU 7.2, see the design notes).

Destination: QEMU waits with ``-incoming defer -S`` behind an NBD export of its empty disk
(``export_incoming_disk``), released once the guest resumed (``release_incoming_disk``). Source: the
disk mirror and the RAM migration up to the completed, paused source (``mirror_and_migrate``), undone
on any failure (``undo_source``), and what a killed worker's attempt left behind (``clear_leftovers``).
"""

import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from workers.qemu import Accelerator, QemuError, QmpError, QmpSession, QmpTimeout

from .forecast import ForecastWatch
from .transfer import POLL_SECONDS, SendJob

logger = logging.getLogger(__name__)

Execute = Callable[[str, dict[str, Any] | None], Any]

MIRROR_NODE = "mig-target"
EXPORT_ID = "mig-export"
MIRROR_READY_TIMEOUT = 3600.0
MIGRATE_TIMEOUT = 6 * 3600.0
DIRTY_RATE_SAMPLE_SECONDS = 1  # calc-dirty-rate's window: its unit is the second
DIRTY_RATE_SAMPLE_PAGES = 4096  # per GiB of RAM (QEMU's default 512 sees 64 pages of a 128 MiB guest)
SWITCH_TIMEOUT = 60.0  # from pre-switchover to completed: the mirror's last blocks and the last RAM pass
UNLIMITED_QEMU_BANDWIDTH = 1 << 40  # bytes/s: lift QEMU's own 32 MiB/s cap; DWCP's limit is the one in force
# The downtime limit is what the guest sees, from its pause on the source to its resume on the
# destination. QEMU's own downtime-limit covers only its last RAM pass; around it come the end of
# the disk mirror, the destination's completion and resume (about 40-50 ms measured by
# bench-migration on this machine). QEMU is given the limit less this reserve, never under the floor.
SWITCHOVER_RESERVE_MS = 40
QEMU_DOWNTIME_FLOOR_MS = 20
# Under TCG QEMU 7.2 loses guest writes when it iterates: measured with RAM dumps of both sides
# (128 MiB guest dirtying 8 MiB/s), migrations that needed a second iteration pass resumed with stale
# pages in 3 of 8, those that switched after one in none of 47. This limit lets QEMU switch after its
# first pass; QEMU's part of the guest pause grew from ~50 ms to 0.24-0.53 s for that guest.
TCG_QEMU_DOWNTIME_MS = 2000
# The guest's MACs sent again from the destination (a RARP per NIC, QEMU's default schedule: 5 rounds,
# from 50 ms, 100 ms apart), so the overlay's learned entries and any LAN switch move to this node.
ANNOUNCE_PARAMETERS = {"initial": 50, "max": 550, "rounds": 5, "step": 100}


def export_incoming_disk(execute: Execute, nbd: Path) -> None:
    """Destination: serve the empty target disk over NBD at ``nbd`` for the source's mirror."""
    execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
    execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(nbd)}}})
    execute(
        "block-export-add",
        {"type": "nbd", "id": EXPORT_ID, "node-name": "disk0", "name": "disk0", "writable": True},
    )


def release_incoming_disk(qmp: QmpSession) -> None:
    """Destination, after the resume: the source's mirror has finished, so nothing writes to it."""
    with contextlib.suppress(QmpError):
        qmp.execute("block-export-del", {"id": EXPORT_ID, "mode": "hard"})
    with contextlib.suppress(QmpError):
        qmp.execute("nbd-server-stop")


def announce(qmp: QmpSession) -> None:
    """Destination, after the resume: announce the guest's NICs (a guest without any: nothing sent)."""
    try:
        qmp.execute("announce-self", ANNOUNCE_PARAMETERS)
    except QmpError as exc:  # the guest runs; the overlay then learns from its own next frames
        logger.warning("announce-self failed: %s", exc)


def mirror_and_migrate(
    qmp: QmpSession,
    job: SendJob,
    *,
    job_id: str,
    disk_socket: Path,
    memory_socket: Path,
    accelerator: Accelerator,
    watch: ForecastWatch,
    on_memory_phase: Callable[[], None],
    connect_timeout: float,
) -> None:
    """The QMP sequence on the source, from the mirror to the completed migration (source paused).

    The disk is mirrored into the destination's NBD export through ``disk_socket`` until READY, then
    RAM migrates through ``memory_socket`` with ``pause-before-switchover``; at the pause the ready
    mirror is cancelled (a consistent finish) and the migration completes. ``blockdev-add`` holds QMP
    while QEMU does the NBD handshake through the tunnel: a link cut then lasts up to the tunnel's
    outage limit, which ``connect_timeout`` covers.
    """
    capabilities = [
        {"capability": "events", "state": True},
        {"capability": "pause-before-switchover", "state": True},
        {"capability": "auto-converge", "state": bool(job.options.get("auto_converge", True))},
    ]
    qmp.execute("migrate-set-capabilities", {"capabilities": capabilities})
    downtime_limit = int(job.options.get("downtime_limit_ms") or 100)
    qemu_limit = max(downtime_limit - SWITCHOVER_RESERVE_MS, QEMU_DOWNTIME_FLOOR_MS)
    if accelerator is Accelerator.TCG:
        qemu_limit = max(qemu_limit, TCG_QEMU_DOWNTIME_MS)
    watch.forecaster.downtime_limit = qemu_limit / 1000  # what decides QEMU's switch
    memory_total = float(job.spec.memory_mb) * (1 << 20)
    clear_leftovers(qmp.execute)
    start_dirty_rate_sampling(qmp)  # first: it takes a second, and the forecast waits for it
    mark = qmp.event_mark()
    qmp.execute(
        "blockdev-add",
        {
            "driver": "nbd",
            "node-name": MIRROR_NODE,
            "server": {"type": "unix", "path": str(disk_socket)},
            "export": "disk0",
        },
        timeout=connect_timeout,
    )
    qmp.execute(
        "blockdev-mirror", {"job-id": job_id, "device": "disk0", "target": MIRROR_NODE, "sync": "top"}
    )
    deadline = time.monotonic() + MIRROR_READY_TIMEOUT
    while not has_event(qmp, mark, "BLOCK_JOB_READY", job_id):
        if time.monotonic() > deadline:
            raise QemuError("the disk mirror did not become ready in time")
        job.knobs.poll()
        read_sampled_dirty_rate(qmp, watch)
        for block_job in qmp.execute("query-block-jobs"):
            if block_job.get("device") == job_id:
                # len grows as the guest writes, so this fraction can drop: the publisher keeps the
                # reported percent monotonic.
                total, offset = float(block_job["len"]), float(block_job["offset"])
                fraction = offset / total if total else 1.0
                forecast = watch.disk(remaining=max(total - offset, 0), memory_total=memory_total)
                job.publisher.update(
                    phase="disk",
                    disk_total=total,
                    disk_processed=offset,
                    disk_remaining=max(total - offset, 0),
                    percent=50.0 * fraction,
                    force=watch.publish_now,
                    **forecast,
                )
        if has_event(qmp, mark, "BLOCK_JOB_CANCELLED", job_id) or has_event(
            qmp, mark, "BLOCK_JOB_ERROR", job_id
        ):
            raise QemuError("the disk mirror failed")
        time.sleep(POLL_SECONDS)
    job.publisher.update(phase="memory", percent=50.0, disk_remaining=0, force=True)
    on_memory_phase()
    qmp.execute(
        "migrate-set-parameters",
        {"downtime-limit": qemu_limit, "max-bandwidth": UNLIMITED_QEMU_BANDWIDTH},
    )
    migrate_mark = qmp.event_mark()
    # The forecast's baseline: QEMU's dirty tracking and the memory stream start with the next command.
    job.publisher.update(**watch.memory_started(memory_total))
    qmp.execute("migrate", {"uri": f"unix:{memory_socket}"})
    stopped_by_us = False
    deadline = time.monotonic() + MIGRATE_TIMEOUT
    while True:
        if time.monotonic() > deadline:
            raise QemuError("the memory migration did not converge in time")
        job.knobs.poll()
        if job.knobs.force_complete and not stopped_by_us:
            qmp.execute("stop")  # pause-and-copy: nothing dirties memory any more, so it converges
            stopped_by_us = True
            # The guest is down until the rest arrives: copy it at the link's speed. A limit
            # set again afterwards (PATCH) still applies.
            job.knobs.control.set_bandwidth_limit(None)
        read_sampled_dirty_rate(qmp, watch)
        info = qmp.execute("query-migrate")
        status = info.get("status")
        ram = info.get("ram") or {}
        if ram:
            forecast = watch.memory(ram)
            total = float(ram.get("total", 0))
            transferred = float(ram.get("transferred", 0))
            remaining = float(ram.get("remaining", 0))
            processed = max(total - remaining, 0.0)
            job.publisher.update(
                phase="memory",
                memory_total=total,
                memory_processed=processed,
                memory_remaining=remaining,
                dirty_rate=float(ram.get("dirty-pages-rate", 0)) * float(ram.get("page-size", 4096)),
                rate_bps=float(ram.get("mbps", 0)) * 1_000_000,
                wire_bytes=transferred,
                percent=50.0 + 49.0 * (processed / total if total else 0.0),
                force=watch.publish_now,
                **forecast,
            )
        if status == "pre-switchover":
            stop = next((event for event in qmp.events_since(migrate_mark) if event.name == "STOP"), None)
            if stop is not None:
                job.publisher.update(source_stopped_at=stop.timestamp)
            break
        if status in ("failed", "cancelled"):
            raise QemuError(f"the memory migration {status}: {info.get('error-desc', '')}")
        with contextlib.suppress(QmpTimeout):  # sleeps, but wakes the moment the pause comes
            qmp.wait_event(
                "MIGRATION",
                timeout=POLL_SECONDS,
                after=migrate_mark,
                match=lambda event: event.data.get("status") in ("pre-switchover", "failed", "cancelled"),
            )
    # The source CPUs are stopped: finish the mirror consistently, then let the migration complete.
    cancel_mark = qmp.event_mark()
    qmp.execute("block-job-cancel", {"device": job_id})
    mirror_done = qmp.wait_event(
        "BLOCK_JOB_COMPLETED",
        timeout=SWITCH_TIMEOUT,
        after=cancel_mark,
        match=lambda event: event.data.get("device") == job_id,
    )
    qmp.execute("migrate-continue", {"state": "pre-switchover"})
    ended = qmp.wait_event(
        "MIGRATION",
        timeout=SWITCH_TIMEOUT,
        after=migrate_mark,
        match=lambda event: event.data.get("status") in ("completed", "failed"),
    )
    job.publisher.update(mirror_completed_at=mirror_done.timestamp, source_completed_at=ended.timestamp)
    info = qmp.execute("query-migrate")
    if info.get("status") != "completed":
        raise QemuError(f"the memory migration ended {info.get('status')}: {info.get('error-desc', '')}")
    with contextlib.suppress(QmpError):
        qmp.execute("blockdev-del", {"node-name": MIRROR_NODE})
    ram = info.get("ram") or {}
    job.publisher.update(
        percent=99.0,
        memory_remaining=0,
        downtime_ms=float(info.get("downtime", 0)),
        qemu={
            "total_time_ms": info.get("total-time"),
            "setup_time_ms": info.get("setup-time"),
            "ram_transferred": ram.get("transferred"),
            "dirty_sync_count": ram.get("dirty-sync-count"),
        },
        force=True,
    )


def start_dirty_rate_sampling(qmp: QmpSession) -> None:
    """Source: sample the guest's dirty rate (page sampling; the dirty-bitmap mode crashes 7.2 under TCG)
    so that the forecast can judge convergence before QEMU's first pass ends."""
    try:
        qmp.execute(
            "calc-dirty-rate",
            {"calc-time": DIRTY_RATE_SAMPLE_SECONDS, "sample-pages": DIRTY_RATE_SAMPLE_PAGES},
        )
    except QmpError as exc:  # the forecast then waits for QEMU's own measurement
        logger.info("calc-dirty-rate refused: %s", exc)


def read_sampled_dirty_rate(qmp: QmpSession, watch: ForecastWatch) -> None:
    """Hand the sampled dirty rate to the forecast once it is measured (until QEMU measures its own)."""
    if not watch.wants_sampled_dirty_rate:
        return
    with contextlib.suppress(QmpError):
        result = qmp.execute("query-dirty-rate")
        if result.get("status") == "measured":
            watch.sampled_dirty_rate(float(result.get("dirty-rate", 0)) * (1 << 20))


def undo_source(qmp: QmpSession, job_id: str, *, resume: bool) -> None:
    """Put the source back as it was: no migration, no mirror, the guest running."""
    for command, arguments in (
        ("migrate_cancel", None),
        ("block-job-cancel", {"device": job_id, "force": True}),
    ):
        with contextlib.suppress(QmpError):
            qmp.execute(command, arguments)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(QmpError):
            jobs = qmp.execute("query-block-jobs")
            if not any(job.get("device") == job_id for job in jobs):
                break
        time.sleep(0.1)
    with contextlib.suppress(QmpError):
        qmp.execute("blockdev-del", {"node-name": MIRROR_NODE})
    with contextlib.suppress(QmpError):
        if resume or qmp.execute("query-status").get("status") in (
            "paused",
            "postmigrate",
            "finish-migrate",
        ):
            qmp.execute("cont")


def clear_leftovers(execute: Execute) -> None:
    """Remove what an earlier attempt left in the source QEMU (its worker was killed mid-migration).

    A SIGKILLed worker cannot run ``undo_source``: QEMU keeps the failed migration, the mirror job
    and the ``mig-target`` NBD node, and the next ``blockdev-add`` would fail on the duplicate name.
    Every step is allowed to fail (nothing to remove is the normal case).
    """
    with contextlib.suppress(QmpError):
        if execute("query-migrate", None).get("status") in ("active", "pre-switchover", "device"):
            execute("migrate_cancel", None)
    with contextlib.suppress(QmpError):
        for block_job in execute("query-block-jobs", None):
            if str(block_job.get("device", "")).startswith("mig-"):
                execute("block-job-cancel", {"device": block_job["device"], "force": True})
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            jobs = execute("query-block-jobs", None)
        except QmpError:
            break
        if not any(str(job.get("device", "")).startswith("mig-") for job in jobs):
            break
        time.sleep(0.1)
    with contextlib.suppress(QmpError):
        execute("blockdev-del", {"node-name": MIRROR_NODE})


def has_event(qmp: QmpSession, mark: int, name: str, job_id: str) -> bool:
    return any(event.name == name and event.data.get("device") == job_id for event in qmp.events_since(mark))
