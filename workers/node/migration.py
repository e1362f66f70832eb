"""The node's side of migrations: prepare (destination), send (source), finish, abort, cleanup.

Live migration follows the sequence measured on QEMU 7.2 (see the design notes): the destination
QEMU waits with ``-incoming defer -S`` behind an NBD export of its empty disk; the source mirrors
its disk into that export through one DWCP tunnel until READY, then migrates RAM through a second
tunnel with ``pause-before-switchover``; at the pause it cancels the ready mirror (a consistent
finish) and lets the migration complete. With both copies paused, the two nodes compare the guest's
RAM (:mod:`.memory_check`; QEMU 7.2 under TCG was measured losing writes); a watcher on the
destination resumes the guest once its incoming migration completed and the check passed, and
reports the switch; only then does the control plane move the VM. Anything that fails before the
switch, a failed memory check included, leaves the source running.

A ``migration.json`` marker in the VM's run directory records which migration and which role a
copy belongs to, so an abort or cleanup never removes a VM this node legitimately runs. A worker that
starts lists its destination copies to the control plane, which names those whose migration ended;
the worker removes them if their guest never ran here.
"""

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from celery import Celery, signals

from workers import contract
from workers.dwcp import (
    DWCPError,
    Progress,
    TransferControl,
    open_tunnel,
    send_file,
)
from workers.dwcp.files import JOURNAL_SUFFIX, PART_SUFFIX
from workers.qemu import (
    Accelerator,
    QemuDriver,
    QemuError,
    QmpError,
    QmpSession,
    QmpTimeout,
    VmSpec,
    VmState,
)
from workers.qemu.memory import SECONDS_PER_GIB, memory_digest

from . import memory_check
from .config import NodeConfig
from .memory_check import Verdict

logger = logging.getLogger(__name__)

MIRROR_NODE = "mig-target"
MARKER = "migration.json"
POLL_SECONDS = 0.2  # control knobs and QEMU progress; progress is published at most every PUBLISH_SECONDS
PUBLISH_SECONDS = 0.25
MIRROR_READY_TIMEOUT = 3600.0
MIGRATE_TIMEOUT = 6 * 3600.0
SWITCH_TIMEOUT = 60.0  # from pre-switchover to completed: the mirror's last blocks and the last RAM pass
INCOMING_TIMEOUT = 6 * 3600.0
# After the switch the tunnels only have their closing to do. The disk tunnel is closed at once: its
# NBD connection could linger (the soak saw it), and while it is open the destination's DWCP server
# keeps the VM's NBD socket busy and refuses the VM's next migration there (the soak's only failed
# migrations, when the VM moved back within seconds). The memory tunnel gets this grace.
TUNNEL_DRAIN_SECONDS = 2.0
# The memory check at the switch: how long one side waits for the other's message, at least this
# and otherwise the time to read the guest's RAM twice.
MEMORY_CHECK_MIN_WAIT = 30.0
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
# QEMU run states of a destination whose guest never ran there: waiting for (or receiving) its incoming
# migration, or not started. Only such a copy is removed as a leftover without an operator.
NEVER_RAN_QEMU_STATES = frozenset({"inmigrate", "prelaunch"})


class MigrationAborted(Exception):
    """The control plane cancelled the migration while this node was working on it."""


class MemoryMismatch(QemuError):
    """The guest's RAM differed between source and destination at the switch.

    ``cause`` ranks the report (``contract.FAILURE_CAUSES``): the destination measured the difference,
    the source only relays the destination's verdict.
    """

    def __init__(self, message: str, *, cause: contract.FailureCause) -> None:
        super().__init__(message)
        self.cause: contract.FailureCause = cause


@dataclass
class _Publisher:
    """Writes the progress hash and channel, coalesced to a few updates a second, percent monotonic."""

    client: redis.Redis
    migration_id: str
    fields: dict[str, Any] = field(default_factory=dict)
    percent: float = 0.0
    last: float = 0.0

    def update(self, *, force: bool = False, **values: Any) -> None:
        self.fields.update({key: value for key, value in values.items() if value is not None})
        if "percent" in values and values["percent"] is not None:
            self.percent = max(self.percent, min(float(values["percent"]), 100.0))
        now = time.monotonic()
        if not force and now - self.last < PUBLISH_SECONDS:
            return
        self.last = now
        snapshot = {**self.fields, "percent": round(self.percent, 2), "updated": time.time()}
        key = contract.MIGRATION_PROGRESS_KEY.format(id=self.migration_id)
        try:
            pipe = self.client.pipeline()
            pipe.hset(key, mapping={name: str(value) for name, value in snapshot.items()})
            pipe.expire(key, 7 * 24 * 3600)
            pipe.publish(contract.MIGRATION_EVENTS_CHANNEL.format(id=self.migration_id), json.dumps(snapshot))
            pipe.execute()
        except redis.RedisError as exc:
            logger.warning("migration %s: progress not published: %s", self.migration_id, exc)


class _Knobs:
    """The control hash, polled: bandwidth, cancel, force-complete."""

    def __init__(self, client: redis.Redis, migration_id: str, control: TransferControl) -> None:
        self.client = client
        self.key = contract.MIGRATION_CONTROL_KEY.format(id=migration_id)
        self.control = control
        self.bandwidth: float | None = control.bandwidth_limit_mbps
        self.force_complete = False

    def poll(self) -> None:
        try:
            raw = self.client.hgetall(self.key)
        except redis.RedisError as exc:
            logger.warning("control knobs unreadable: %s", exc)
            return
        knobs = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in raw.items()
        }
        if knobs.get("cancel") == "1":
            self.control.cancel()
            raise MigrationAborted("cancelled by the control plane")
        if "bandwidth_limit_mbps" in knobs:
            text = knobs["bandwidth_limit_mbps"]
            bandwidth = float(text) if text else None
            if bandwidth != self.bandwidth:
                self.control.set_bandwidth_limit(bandwidth)
                self.bandwidth = bandwidth
        self.force_complete = knobs.get("force_complete") == "1"


class MigrationRunner:
    """Runs the migration tasks of one node."""

    def __init__(self, config: NodeConfig, driver: QemuDriver, app: Celery, client: redis.Redis) -> None:
        self.config = config
        self.driver = driver
        self.app = app
        self.redis = client
        self._controls: dict[str, TransferControl] = {}
        self._lock = threading.Lock()
        # One lock per VM for the short steps that create or remove its files here (prepare, abort,
        # cleanup): a ping-pong migration's prepare and the cleanup of the move before it can run at
        # once on the same node, and the cleanup removed the new copy's disk (seen once in the soak).
        self._vm_locks: dict[str, threading.RLock] = {}

    def _vm_lock(self, uuid: str) -> threading.RLock:
        with self._lock:
            return self._vm_locks.setdefault(uuid, threading.RLock())

    # -- reporting -------------------------------------------------------------------------------

    def report(self, migration_id: str, role: str, event: str, detail: str = "", **extra: Any) -> None:
        logger.info("migration %s (%s): %s %s", migration_id, role, event, detail)
        self.app.send_task(
            contract.CONTROL_MIGRATION_REPORT,
            kwargs={
                "migration_id": migration_id,
                "node": self.config.name,
                "role": role,
                "event": event,
                "detail": detail[:2000],
                **extra,
            },
            queue=contract.CONTROL_QUEUE,
        )

    def _marker(self, uuid: str) -> Path:
        return self.driver.paths(uuid).run_dir / MARKER

    def _write_marker(self, uuid: str, migration_id: str, role: str) -> None:
        marker = self._marker(uuid)
        marker.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        marker.write_text(json.dumps({"migration_id": migration_id, "role": role}))

    def _role(self, uuid: str) -> str | None:
        """The role the migration marker gives this node's copy of ``uuid`` (None: no marker)."""
        try:
            role = json.loads(self._marker(uuid).read_text()).get("role")
        except (OSError, ValueError, AttributeError):
            return None
        return role if isinstance(role, str) else None

    def _marked(self, uuid: str, migration_id: str, role: str) -> bool:
        try:
            data = json.loads(self._marker(uuid).read_text())
        except (OSError, ValueError):
            return False
        return bool(data.get("migration_id") == migration_id and data.get("role") == role)

    def _redelivered(self, uuid: str, migration_id: str, role: str) -> bool:
        """Whether this prepare/send already started here once: then it must not run again.

        Migration tasks run at most once per node. They are ``acks_late`` without
        ``reject_on_worker_lost``, but the broker can still hand one out twice: when the worker's
        broker connection drops while the task runs, kombu puts the unacknowledged message back on
        the queue (found by the fault test 'Redis restarted during a live migration'). A second send
        of a completed live migration would resume the paused source beside the running destination.
        The marker written when the task started tells a repeat apart; what the first run did is
        settled by its own reports or, if it died, by the watchdog and the abort that follows.
        """
        if not self._marked(uuid, migration_id, role):
            return False
        logger.warning("migration %s (%s): task delivered again; not running it twice", migration_id, role)
        return True

    def _guarded(self, migration_id: str, role: str, work: Callable[[], None]) -> None:
        try:
            work()
        except MigrationAborted as exc:
            self.report(migration_id, role, "cancelled", str(exc))
        except (QemuError, DWCPError, OSError, redis.RedisError) as exc:
            logger.exception("migration %s (%s) failed", migration_id, role)
            cause = exc.cause if isinstance(exc, MemoryMismatch) else "error"
            self.report(migration_id, role, "failed", f"{type(exc).__name__}: {exc}", cause=cause)
        except Exception as exc:
            logger.exception("migration %s (%s) failed unexpectedly", migration_id, role)
            self.report(migration_id, role, "failed", f"node error: {exc!r}")

    # -- destination -----------------------------------------------------------------------------

    def prepare(self, *, migration_id: str, vm: dict[str, Any], mode: str, source_node: str) -> None:
        spec = VmSpec.from_dict(vm)
        if self._redelivered(spec.uuid, migration_id, "dest"):
            return
        with self._vm_lock(spec.uuid):
            self._guarded(migration_id, "dest", lambda: self._prepare(migration_id, spec, mode))

    def _prepare(self, migration_id: str, spec: VmSpec, mode: str) -> None:
        paths = self.driver.paths(spec.uuid)
        if paths.spec.exists() and self._role(spec.uuid) == "source":
            # The copy this node sent away in an earlier migration, its cleanup still queued behind this
            # task: the control plane records the VM elsewhere, so the leftover goes now.
            logger.info("VM %s: removing the leftover source copy of an earlier migration", spec.uuid)
            self.driver.delete(spec.uuid)
        if paths.spec.exists() and not self._marked(spec.uuid, migration_id, "dest"):
            raise QemuError(f"VM {spec.uuid} already exists on {self.config.name}; refusing to overwrite it")
        self._write_marker(spec.uuid, migration_id, "dest")
        if mode == "cold":
            paths.disk.unlink(missing_ok=True)
            target = str(paths.disk.relative_to(self.config.data_dir))
            self.report(
                migration_id, "dest", "prepared", "ready to receive the disk", targets={"disk": target}
            )
            return
        self.driver.create(spec)
        self.driver.start(spec.uuid, incoming=True)
        nbd = paths.run_dir / "nbd.sock"
        incoming = paths.run_dir / "incoming.sock"
        for stale in (nbd, incoming):
            stale.unlink(missing_ok=True)
        execute = self._executor(spec.uuid)
        execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
        execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(nbd)}}})
        execute(
            "block-export-add",
            {"type": "nbd", "id": "mig-export", "node-name": "disk0", "name": "disk0", "writable": True},
        )
        # The watcher holds the second monitor before the migration can start, so no event is missed.
        ready = threading.Event()
        watcher = threading.Thread(
            target=self._guarded,
            args=(migration_id, "dest", lambda: self._watch_incoming(migration_id, spec, ready)),
            name=f"incoming-{spec.uuid[:8]}",
            daemon=True,
        )
        watcher.start()
        if not ready.wait(30):
            raise QemuError("could not open the destination's job monitor")
        execute("migrate-incoming", {"uri": f"unix:{incoming}"})
        run_root = self.config.data_dir / "run"
        targets = {"disk": str(nbd.relative_to(run_root)), "memory": str(incoming.relative_to(run_root))}
        self.report(migration_id, "dest", "prepared", "incoming QEMU waiting", targets=targets)

    def _executor(self, uuid: str) -> Callable[[str, dict[str, Any] | None], Any]:
        def execute(command: str, arguments: dict[str, Any] | None = None) -> Any:
            return self.driver.execute(uuid, command, arguments)

        return execute

    def _watch_incoming(self, migration_id: str, spec: VmSpec, ready: threading.Event) -> None:
        """Resume the destination once its incoming migration completed (it waits paused, -S) and
        its RAM matched the source's.

        The source finished its disk mirror before it let the migration complete, so nothing writes
        to the NBD export any more: drop it, resume the guest, then stop the NBD server.
        """
        uuid = spec.uuid
        with self.driver.job_session(uuid) as qmp:
            mark = qmp.event_mark()
            ready.set()
            deadline = time.monotonic() + INCOMING_TIMEOUT
            while True:
                try:
                    event = qmp.wait_event(
                        "MIGRATION",
                        timeout=5,
                        after=mark,
                        match=lambda event: event.data.get("status") in ("completed", "failed"),
                    )
                    break
                except QmpTimeout:
                    if not self._marked(uuid, migration_id, "dest"):
                        return  # aborted: the copy was removed
                    if not qmp.connected or time.monotonic() > deadline:
                        raise QemuError("the destination QEMU stopped waiting for the migration") from None
            if event.data.get("status") != "completed":
                raise QemuError("the incoming migration failed on the destination")
            completed_at = event.timestamp
            verdict, check_ms = self._check_incoming_memory(qmp, migration_id, spec)
            # Resume first (the guest is waiting: this is downtime), then answer the source and drop
            # the export: the source's mirror has finished, so no write comes through it any more.
            resume_mark = qmp.event_mark()
            qmp.execute("cont")
            resumed = qmp.wait_event("RESUME", timeout=10, after=resume_mark)
            memory_check.answer(self.redis, migration_id, verdict, MEMORY_CHECK_MIN_WAIT)
            with contextlib.suppress(QmpError):
                qmp.execute("block-export-del", {"id": "mig-export", "mode": "hard"})
            with contextlib.suppress(QmpError):
                qmp.execute("nbd-server-stop")
        self._marker(uuid).unlink(missing_ok=True)
        self.report(
            migration_id,
            "dest",
            "switched",
            "destination resumed",
            stats={
                "dest_completed_at": completed_at,
                "dest_resumed_at": resumed.timestamp,
                "memory_check": verdict.value,
                "memory_check_ms": check_ms,
            },
        )

    def _verifies_memory(self) -> bool:
        setting = self.config.verify_memory
        return setting == "on" or (setting == "auto" and self.driver.accelerator is Accelerator.TCG)

    def _check_incoming_memory(
        self, qmp: QmpSession, migration_id: str, spec: VmSpec
    ) -> tuple[Verdict, float]:
        """Compare the paused destination's RAM with the source's digest; stop this copy on a mismatch
        (and answer the source). The caller resumes the guest on any other verdict, then answers.

        What keeps the check from being made (no digest in time, a malformed one, this copy's RAM
        unreadable) resumes the guest unverified, as before the check existed: the source is paused
        in ``postmigrate`` and never resumes by itself, so failing here would stop the guest on both.
        """
        started = time.monotonic()
        wait = memory_check_wait(spec.memory_mb)
        scratch = self.driver.paths(spec.uuid).run_dir
        verdict = Verdict.UNVERIFIED
        try:
            pid = self.driver.status(spec.uuid).pid
            own = None
            if self._verifies_memory():
                own = memory_digest(qmp, spec.memory_mb, pid=pid, scratch=scratch)
            offer = memory_check.wait_offer(self.redis, migration_id, wait)
            if offer is None:
                logger.warning("migration %s: no memory digest from the source in %g s", migration_id, wait)
            elif offer.digest is None:
                verdict = Verdict.SKIPPED
            else:
                if own is None or own.method != offer.digest.method:  # both sides must read alike
                    own = memory_digest(
                        qmp, spec.memory_mb, pid=pid, method=offer.digest.method, scratch=scratch
                    )
                differing = own.differing(offer.digest)
                if differing:
                    self._refuse_incoming(qmp, migration_id)
                    raise MemoryMismatch(
                        f"guest memory arrived different from the source's in {differing} of "
                        f"{len(offer.digest.chunks)} MiB although QEMU reported the migration complete; the "
                        "destination copy was stopped before it ran and the source is told to resume its own",
                        cause="measured",
                    )
                verdict = Verdict.MATCH
        except MemoryMismatch:
            raise
        except (QemuError, ValueError) as exc:
            logger.warning("migration %s: memory check not made: %s", migration_id, exc)
        if verdict is Verdict.UNVERIFIED:
            logger.warning("migration %s: the destination resumes with its memory unverified", migration_id)
        return verdict, round((time.monotonic() - started) * 1000, 1)

    def _refuse_incoming(self, qmp: QmpSession, migration_id: str) -> None:
        """Stop this never-run copy for good, then tell the source it may resume its own."""
        with contextlib.suppress(QmpError):
            qmp.execute("quit")
        if not memory_check.answer(self.redis, migration_id, Verdict.MISMATCH, MEMORY_CHECK_MIN_WAIT):
            logger.error("migration %s: could not tell the source of the memory mismatch", migration_id)

    def finish(self, *, migration_id: str, vm: dict[str, Any], start: bool) -> None:
        """Cold: define the VM around the received disk and start it if it was running."""
        spec = VmSpec.from_dict(vm)

        def work() -> None:
            if not self._marked(spec.uuid, migration_id, "dest"):
                raise QemuError("no prepared copy of this migration here")
            self.driver.create(spec)  # the received disk is in place: this only records the VM
            if start:
                self.driver.start(spec.uuid)
            self._marker(spec.uuid).unlink(missing_ok=True)
            self.report(migration_id, "dest", "switched", "started" if start else "defined (stopped)")

        self._guarded(migration_id, "dest", work)

    # -- source ----------------------------------------------------------------------------------

    def send(
        self,
        *,
        migration_id: str,
        vm: dict[str, Any],
        mode: str,
        dest_node: str,
        dest_dwcp_address: str,
        tickets: dict[str, str],
        targets: dict[str, str],
        options: dict[str, Any],
    ) -> None:
        spec = VmSpec.from_dict(vm)
        if self._redelivered(spec.uuid, migration_id, "source"):
            return
        control = TransferControl(bandwidth_limit_mbps=options.get("bandwidth_limit_mbps"))
        job = _SendJob(
            migration_id=migration_id,
            spec=spec,
            address=dest_dwcp_address,
            tickets=tickets,
            targets=targets,
            options=options,
            control=control,
            knobs=_Knobs(self.redis, migration_id, control),
            publisher=_Publisher(self.redis, migration_id),
        )
        with self._lock:
            self._controls[migration_id] = control
        self._write_marker(spec.uuid, migration_id, "source")
        try:
            run = self._send_cold if mode == "cold" else self._send_live
            self._guarded(migration_id, "source", lambda: run(job))
        finally:
            with self._lock:
                self._controls.pop(migration_id, None)

    def _send_cold(self, job: "_SendJob") -> None:
        job.knobs.poll()
        if self.driver.status(job.spec.uuid).state in (VmState.RUNNING, VmState.PAUSED):
            self.driver.stop(job.spec.uuid)
        disk = self.driver.paths(job.spec.uuid).disk
        total = disk.stat().st_size
        job.publisher.update(
            phase="disk", disk_total=total, disk_processed=0, disk_remaining=total, percent=0, force=True
        )
        done = threading.Event()

        def on_progress(progress: Progress) -> None:
            job.publisher.update(
                phase="disk",
                disk_total=total,
                disk_processed=progress.raw_bytes,
                disk_remaining=max(total - progress.raw_bytes, 0),
                wire_bytes=progress.wire_bytes,
                rate_bps=progress.rate_bytes_per_second * 8,
                eta_seconds=progress.eta_seconds,
                percent=100.0 * progress.raw_bytes / total if total else 100.0,
            )

        def poll_knobs() -> None:
            while not done.wait(POLL_SECONDS):
                with contextlib.suppress(MigrationAborted):
                    job.knobs.poll()

        poller = threading.Thread(target=poll_knobs, daemon=True)
        poller.start()
        try:
            result = send_file(
                disk,
                address=job.address,
                name=job.targets["disk"],
                ticket=job.tickets["disk"],
                secret=self.config.dwcp_secret,
                source_node=self.config.name,
                streams=int(job.options.get("streams") or 4),
                control=job.control,
                reporter=_CallbackReporter(on_progress),
            )
        finally:
            done.set()
        if job.control.cancelled.is_set():
            raise MigrationAborted("cancelled by the control plane")
        job.publisher.update(
            percent=100.0, disk_processed=total, disk_remaining=0, wire_bytes=result.wire_bytes, force=True
        )
        self.report(
            job.migration_id,
            "source",
            "transferred",
            f"disk sent and verified ({result.raw_bytes} bytes, {result.wire_bytes} on the wire)",
            stats={
                "wire_bytes": result.wire_bytes,
                "disk_bytes": result.raw_bytes,
                "transfer_seconds": result.seconds,
                "codec_mix": result.codec_mix,
                "downtime_ms": None,
            },
        )

    def _send_live(self, job: "_SendJob") -> None:
        paths = self.driver.paths(job.spec.uuid)
        disk_socket = paths.run_dir / "mig-disk.sock"
        memory_socket = paths.run_dir / "mig-mem.sock"
        streams = int(job.options.get("streams") or 4)
        tunnels = [
            open_tunnel(
                address=job.address,
                local_path=local,
                ticket=job.tickets[name],
                secret=self.config.dwcp_secret,
                source_node=self.config.name,
                streams=streams,
                control=job.control,
            )
            for name, local in (("disk", disk_socket), ("memory", memory_socket))
        ]
        job_id = f"mig-{job.migration_id[:8]}"
        try:
            with self.driver.job_session(job.spec.uuid) as qmp:
                try:
                    self._live_sequence(qmp, job, job_id, disk_socket, memory_socket)
                except BaseException:
                    self._undo_source(qmp, job_id, resume=job.knobs.force_complete)
                    raise
                self._offer_memory(qmp, job)
            disk_tunnel, memory_tunnel = tunnels
            # The mirror has finished and its NBD client is gone: the disk tunnel has nothing left to
            # carry. Closed now, it frees the destination's target for this VM's next migration.
            disk_tunnel.close()
            wire = disk_tunnel.wire_bytes
            try:  # the memory stream ended with the migration; its tunnel closes by itself
                wire += memory_tunnel.wait(timeout=TUNNEL_DRAIN_SECONDS).wire_bytes
            except (DWCPError, TimeoutError) as exc:
                wire += memory_tunnel.wire_bytes
                logger.warning(
                    "migration %s: memory tunnel closed without its result after %g s: %s",
                    job.migration_id,
                    TUNNEL_DRAIN_SECONDS,
                    exc,
                )
        finally:
            for tunnel in tunnels:
                tunnel.close()
        final = job.publisher.fields
        job.publisher.update(wire_bytes=wire, force=True)
        self.report(
            job.migration_id,
            "source",
            "transferred",
            "live migration completed; source paused",
            stats={
                "qemu_downtime_ms": final.get("downtime_ms"),
                "source_stopped_at": final.get("source_stopped_at"),
                "mirror_completed_at": final.get("mirror_completed_at"),
                "source_completed_at": final.get("source_completed_at"),
                "memory_total": final.get("memory_total"),
                "disk_total": final.get("disk_total"),
                "wire_bytes": wire,
                "qemu": final.get("qemu", {}),
            },
        )

    def _live_sequence(
        self, qmp: QmpSession, job: "_SendJob", job_id: str, disk_socket: Path, memory_socket: Path
    ) -> None:
        """The QMP sequence on the source, from the mirror to the completed migration (source paused)."""
        capabilities = [
            {"capability": "events", "state": True},
            {"capability": "pause-before-switchover", "state": True},
            {"capability": "auto-converge", "state": bool(job.options.get("auto_converge", True))},
        ]
        qmp.execute("migrate-set-capabilities", {"capabilities": capabilities})
        _clear_leftovers(qmp.execute)
        mark = qmp.event_mark()
        qmp.execute(
            "blockdev-add",
            {
                "driver": "nbd",
                "node-name": MIRROR_NODE,
                "server": {"type": "unix", "path": str(disk_socket)},
                "export": "disk0",
            },
        )
        qmp.execute(
            "blockdev-mirror", {"job-id": job_id, "device": "disk0", "target": MIRROR_NODE, "sync": "top"}
        )
        deadline = time.monotonic() + MIRROR_READY_TIMEOUT
        while not _has_event(qmp, mark, "BLOCK_JOB_READY", job_id):
            if time.monotonic() > deadline:
                raise QemuError("the disk mirror did not become ready in time")
            job.knobs.poll()
            for block_job in qmp.execute("query-block-jobs"):
                if block_job.get("device") == job_id:
                    # len grows as the guest writes, so this fraction can drop: the publisher keeps the
                    # reported percent monotonic.
                    total, offset = float(block_job["len"]), float(block_job["offset"])
                    fraction = offset / total if total else 1.0
                    job.publisher.update(
                        phase="disk",
                        disk_total=total,
                        disk_processed=offset,
                        disk_remaining=max(total - offset, 0),
                        percent=50.0 * fraction,
                    )
            if _has_event(qmp, mark, "BLOCK_JOB_CANCELLED", job_id) or _has_event(
                qmp, mark, "BLOCK_JOB_ERROR", job_id
            ):
                raise QemuError("the disk mirror failed")
            time.sleep(POLL_SECONDS)
        job.publisher.update(phase="memory", percent=50.0, disk_remaining=0, force=True)
        self.report(job.migration_id, "source", "phase", "memory")
        downtime_limit = int(job.options.get("downtime_limit_ms") or 100)
        qemu_limit = max(downtime_limit - SWITCHOVER_RESERVE_MS, QEMU_DOWNTIME_FLOOR_MS)
        if self.driver.accelerator is Accelerator.TCG:
            qemu_limit = max(qemu_limit, TCG_QEMU_DOWNTIME_MS)
        qmp.execute(
            "migrate-set-parameters",
            {"downtime-limit": qemu_limit, "max-bandwidth": UNLIMITED_QEMU_BANDWIDTH},
        )
        migrate_mark = qmp.event_mark()
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
            info = qmp.execute("query-migrate")
            status = info.get("status")
            ram = info.get("ram") or {}
            if ram:
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
                    eta_seconds=(remaining * 8 / (float(ram["mbps"]) * 1_000_000))
                    if ram.get("mbps")
                    else None,
                    percent=50.0 + 49.0 * (processed / total if total else 0.0),
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

    def _offer_memory(self, qmp: QmpSession, job: "_SendJob") -> None:
        """Send the paused source's RAM digest and act on the destination's verdict.

        On ``mismatch`` the destination stopped its copy before it ran: resume this one and fail.
        Anything else leaves the source paused, as before the check existed: the destination resumes
        (verified or not) and the control plane settles the rest.
        """
        wait = memory_check_wait(job.spec.memory_mb)
        digest = None
        if self._verifies_memory():
            try:
                digest = memory_digest(
                    qmp,
                    job.spec.memory_mb,
                    pid=self.driver.status(job.spec.uuid).pid,
                    scratch=self.driver.paths(job.spec.uuid).run_dir,
                )
            except QemuError as exc:
                logger.warning("migration %s: source memory digest failed: %s", job.migration_id, exc)
        if not memory_check.offer(self.redis, job.migration_id, digest, wait) or digest is None:
            return
        verdict = memory_check.wait_verdict(self.redis, job.migration_id, wait * 2)
        if verdict is Verdict.MISMATCH:
            qmp.execute("cont")
            raise MemoryMismatch(
                "the destination's memory check failed (QEMU did not deliver every guest write); "
                "the source resumed",
                cause="relayed",
            )
        if verdict is None:
            logger.warning("migration %s: no memory check verdict from the destination", job.migration_id)

    def _undo_source(self, qmp: QmpSession, job_id: str, *, resume: bool) -> None:
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

    # -- abort / cleanup -------------------------------------------------------------------------

    def abort(self, *, migration_id: str, vm: dict[str, Any], role: str, restart: bool = False) -> None:
        spec = VmSpec.from_dict(vm)

        def work() -> None:
            if role == "source":
                with self._lock:
                    control = self._controls.get(migration_id)
                if control is not None:
                    control.cancel()
                elif (
                    restart
                    and self.driver.status(spec.uuid).state == VmState.PAUSED
                    and not self._handed_over(spec.uuid)
                ):
                    # No send of this migration runs here (this worker was restarted while it ran) and
                    # the dead attempt left the guest paused at the switchover: resume it. Not when QEMU's
                    # migration completed: the destination then holds the guest, and resuming this copy
                    # would run it twice (what the soak test saw when the watchdog failed a switching
                    # migration). QEMU's other leftovers are cleared by the next send.
                    self.driver.execute(spec.uuid, "cont")
                if restart and self.driver.paths(spec.uuid).spec.exists():
                    state = self.driver.status(spec.uuid).state
                    if state not in (VmState.RUNNING, VmState.PAUSED):
                        self.driver.start(spec.uuid)
                if self._marked(spec.uuid, migration_id, "source"):
                    self._marker(spec.uuid).unlink(missing_ok=True)
                self.report(
                    migration_id, role, "aborted", "source left running" if restart else "source untouched"
                )
                return
            if self._marked(spec.uuid, migration_id, "dest"):
                self.driver.delete(spec.uuid)
                self._remove_partial_disk(spec.uuid)
                self.report(migration_id, role, "aborted", "destination copy removed")
            else:
                self.report(migration_id, role, "aborted", "nothing of this migration here")

        with self._vm_lock(spec.uuid):
            self._guarded(migration_id, role, work)

    def _handed_over(self, uuid: str) -> bool:
        """Whether this QEMU migrated its guest out (run state ``postmigrate``).

        Not ``query-migrate``: a VM that arrived by migration reports its incoming one as completed.
        """
        try:
            return bool(self.driver.execute(uuid, "query-status").get("status") == "postmigrate")
        except QemuError:
            return False

    def _remove_partial_disk(self, uuid: str) -> None:
        """Drop what the DWCP receiver kept of an interrupted disk transfer (its part and journal).

        Kept for a resume of the same transfer, but an aborted migration will not resume: left behind
        they fill the disk (found by the 'destination disk full' fault test: the partial file kept
        the full filesystem full after the rollback).
        """
        disk = self.driver.paths(uuid).disk
        # The journal's scratch copy too: a journal write that hit ENOSPC leaves it behind.
        for suffix in (PART_SUFFIX, JOURNAL_SUFFIX, f"{JOURNAL_SUFFIX}.tmp"):
            disk.with_name(f".{disk.name}{suffix}").unlink(missing_ok=True)

    # -- leftovers of migrations cut short -------------------------------------------------------

    def destination_copies(self) -> list[contract.MigrationCopy]:
        """The destination copies this node's migration markers name (prepared, never switched here)."""
        copies: list[contract.MigrationCopy] = []
        for uuid in self.driver.layout.vm_uuids():
            try:
                marker = json.loads(self._marker(uuid).read_text())
            except (OSError, ValueError):
                continue
            if isinstance(marker, dict) and marker.get("role") == "dest" and marker.get("migration_id"):
                copies.append({"migration_id": str(marker["migration_id"]), "vm_id": uuid, "role": "dest"})
        return copies

    def report_copies(self) -> None:
        """At start: ask the control plane which of this node's destination copies are leftovers.

        This node cannot tell an active migration from one that ended while it was down (its abort lost
        or never sent); the control plane answers with NODE_MIGRATION_LEFTOVERS.
        """
        copies = self.destination_copies()
        if not copies:
            return
        logger.info(
            "node %s holds %d destination copies; asking which are leftovers", self.config.name, len(copies)
        )
        self.app.send_task(
            contract.CONTROL_MIGRATION_COPIES,
            kwargs={"node": self.config.name, "copies": copies},
            queue=contract.CONTROL_QUEUE,
        )

    def remove_leftovers(self, *, ended: list[contract.MigrationCopy]) -> None:
        """Remove the destination copies whose migration the control plane says is no longer active.

        Only while the copy's marker still names that migration (a later migration of the VM here made
        it its own) and its guest never ran here: a QEMU still waiting for its incoming migration, or
        none at all. A copy whose guest ran (paused, running) may be the VM's only one: it is kept and
        reported ("kept") for an operator.
        """
        for copy in ended:
            uuid, migration_id = copy["vm_id"], copy["migration_id"]
            with self._vm_lock(uuid):
                if not self._marked(uuid, migration_id, "dest"):
                    continue
                try:
                    kept = self._guest_ran_here(uuid)
                    if not kept:
                        self.driver.delete(uuid)
                        self._remove_partial_disk(uuid)
                except (QemuError, OSError) as exc:
                    kept = f"it could not be removed: {exc}"
                if kept:
                    logger.warning(
                        "VM %s: leftover destination copy of %s kept: %s", uuid, migration_id, kept
                    )
                    self.report(migration_id, "dest", "kept", f"leftover destination copy kept: {kept}")
                else:
                    detail = "leftover destination copy removed when the node worker started"
                    self.report(migration_id, "dest", "aborted", detail)

    def _guest_ran_here(self, uuid: str) -> str:
        """Why the copy's guest may have run here; '' when it cannot (it never left its incoming wait)."""
        if not self.driver.paths(uuid).spec.exists():
            return ""  # no VM defined: a half-received disk
        status = self.driver.status(uuid)
        if status.pid is None or status.qemu_status in NEVER_RAN_QEMU_STATES:
            return ""
        return f"its QEMU is {status.qemu_status or status.state}"

    def cleanup(self, *, migration_id: str, vm: dict[str, Any]) -> None:
        spec = VmSpec.from_dict(vm)

        def work() -> None:
            if not self._marked(spec.uuid, migration_id, "source"):
                self.report(migration_id, "source", "cleaned", "nothing to clean")
                return
            self.driver.delete(spec.uuid)
            self.report(migration_id, "source", "cleaned", "source copy removed")

        with self._vm_lock(spec.uuid):
            self._guarded(migration_id, "source", work)


@dataclass
class _SendJob:
    """Everything one outgoing transfer needs."""

    migration_id: str
    spec: VmSpec
    address: str
    tickets: dict[str, str]
    targets: dict[str, str]
    options: dict[str, Any]
    control: TransferControl
    knobs: _Knobs
    publisher: _Publisher


class _CallbackReporter:
    def __init__(self, callback: Callable[[Progress], None]) -> None:
        self.callback = callback

    def report(self, progress: Progress) -> None:
        self.callback(progress)


def memory_check_wait(memory_mb: int) -> float:
    """Seconds one side of the memory check waits for the other's message."""
    return max(MEMORY_CHECK_MIN_WAIT, 2 * SECONDS_PER_GIB * memory_mb / 1024)


def _clear_leftovers(execute: Callable[[str, dict[str, Any] | None], Any]) -> None:
    """Remove what an earlier attempt left in the source QEMU (its worker was killed mid-migration).

    A SIGKILLed worker cannot run ``_undo_source``: QEMU keeps the failed migration, the mirror job
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


def _has_event(qmp: QmpSession, mark: int, name: str, job_id: str) -> bool:
    return any(event.name == name and event.data.get("device") == job_id for event in qmp.events_since(mark))


def register_migration_tasks(app: Celery, runner: MigrationRunner) -> None:
    """Bind the migration tasks of ``workers.contract`` to this node."""
    # At most once per node: a migration step must not run twice (a second send of a completed live
    # migration would resume the handed-over source). ``reject_on_worker_lost`` is off and prepare/send
    # check their marker against a redelivery; a step lost with its worker is settled by the control
    # side's watchdog (MIGRATION_STALL_TIMEOUT) and the abort that follows.
    options: dict[str, Any] = {
        "acks_late": True,
        "reject_on_worker_lost": False,
        "time_limit": int(MIGRATE_TIMEOUT) + 600,
    }
    app.task(name=contract.NODE_MIGRATION_PREPARE, **options)(runner.prepare)
    app.task(name=contract.NODE_MIGRATION_SEND, **options)(runner.send)
    app.task(name=contract.NODE_MIGRATION_FINISH, **options)(runner.finish)
    app.task(name=contract.NODE_MIGRATION_ABORT, **options)(runner.abort)
    app.task(name=contract.NODE_MIGRATION_CLEANUP, **options)(runner.cleanup)
    app.task(name=contract.NODE_MIGRATION_LEFTOVERS, **options)(runner.remove_leftovers)
    # Once the worker consumes its queue, so that the answer is taken as soon as it comes.
    signals.worker_ready.connect(lambda **_: runner.report_copies(), weak=False)
