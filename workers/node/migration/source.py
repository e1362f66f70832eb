"""The source's side of a migration: send (cold or live), abort, and the cleanup after the switch.

Cold: the VM is stopped and its disk streamed to the destination's file over DWCP (verified there); a
cut link is resumed by DWCP within the node's outage limit, progress showing ``link: reconnecting``.
Live: the disk mirror and RAM migration run through two DWCP tunnels (``qmp_steps``) up to a completed
migration with the guest paused here; then the memory check (``memory_check``) may hand the guest back
(a mismatch: the source resumes and fails). Nothing here removes the VM before the control plane has
recorded it on the destination (``cleanup``); a failure before that leaves the source running.
"""

import contextlib
import logging
import threading

from workers import contract
from workers.dwcp import DWCPError, Progress, TransferControl, TransferResult, open_tunnel, send_file
from workers.qemu import QemuError, QmpSession, VmSpec, VmState
from workers.qemu.memory import memory_digest

from . import memory_check, qmp_steps
from .context import NodeMigrations
from .forecast import Forecast, ForecastWatch
from .memory_check import MemoryMismatch, Verdict, memory_check_wait
from .transfer import POLL_SECONDS, Knobs, MigrationAborted, ProgressCallback, Publisher, SendJob

logger = logging.getLogger(__name__)

# After the switch the tunnels only have their closing to do. The disk tunnel is closed at once: its
# NBD connection could linger (the soak saw it), and while it is open the destination's DWCP server
# keeps the VM's NBD socket busy and refuses the VM's next migration there (the soak's only failed
# migrations, when the VM moved back within seconds). The memory tunnel gets this grace.
TUNNEL_DRAIN_SECONDS = 2.0
# QEMU's NBD handshake through a cut tunnel waits for the link at most the outage limit, and then this.
CONNECT_MARGIN_SECONDS = 10.0


def _outages_survived(result: TransferResult) -> str:
    """The link cuts a disk transfer came back from, for its report (empty when there were none)."""
    if not result.outages:
        return ""
    lengths = ", ".join(f"{seconds:.1f}" for seconds in result.outages)
    return f", {len(result.outages)} link outages survived ({lengths} s), {result.bytes_resent} bytes resent"


class Source:
    """Sends this node's VMs away; holds the transfer control of each send running here."""

    def __init__(self, node: NodeMigrations) -> None:
        self.node = node
        self.driver = node.driver
        self._controls: dict[str, TransferControl] = {}
        self._lock = threading.Lock()

    def send(self, request: contract.MigrationSend) -> None:
        migration_id = request["migration_id"]
        spec = VmSpec.from_dict(request["vm"])
        if self.node.markers.redelivered(spec.uuid, migration_id, "source"):
            return
        control = TransferControl(bandwidth_limit_mbps=request["options"].get("bandwidth_limit_mbps"))
        job = SendJob(
            migration_id=migration_id,
            spec=spec,
            address=request["dest_dwcp_address"],
            tickets=request["tickets"],
            targets=request["targets"],
            options=request["options"],
            control=control,
            knobs=Knobs(self.node.redis, migration_id, control),
            publisher=Publisher(self.node.redis, migration_id),
        )
        with self._lock:
            self._controls[migration_id] = control
        self.node.markers.write(spec.uuid, migration_id, "source")
        try:
            run = self._send_cold if request["mode"] == "cold" else self._send_live
            self.node.guarded(migration_id, "source", lambda: run(job))
        finally:
            with self._lock:
                self._controls.pop(migration_id, None)

    def _send_cold(self, job: SendJob) -> None:
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
            reconnecting = progress.phase == "reconnecting"
            job.publisher.update(
                phase="disk",
                disk_total=total,
                disk_processed=progress.raw_bytes,
                disk_remaining=max(total - progress.raw_bytes, 0),
                wire_bytes=progress.wire_bytes,
                rate_bps=progress.rate_bytes_per_second * 8,
                eta_seconds=progress.eta_seconds,
                percent=100.0 * progress.raw_bytes / total if total else 100.0,
                # As a live migration's: the watchdog spares a link DWCP is reconnecting.
                link="reconnecting" if reconnecting else "up",
                outage_seconds=(progress.outage_seconds or 0) if reconnecting else 0,
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
                secret=self.node.config.dwcp_secret,
                source_node=self.node.config.name,
                streams=job.streams,
                control=job.control,
                reporter=ProgressCallback(on_progress),
                link_outage_seconds=self.node.config.link_outage_seconds,
            )
        finally:
            done.set()
        if job.control.cancelled.is_set():
            raise MigrationAborted("cancelled by the control plane")
        job.publisher.update(
            percent=100.0, disk_processed=total, disk_remaining=0, wire_bytes=result.wire_bytes, force=True
        )
        self.node.report(
            job.migration_id,
            "source",
            "transferred",
            f"disk sent and verified ({result.raw_bytes} bytes, {result.wire_bytes} on the wire"
            f"{_outages_survived(result)})",
            stats={
                "wire_bytes": result.wire_bytes,
                "disk_bytes": result.raw_bytes,
                "transfer_seconds": result.seconds,
                "codec_mix": result.codec_mix,
                "downtime_ms": None,
            },
        )

    def _send_live(self, job: SendJob) -> None:
        paths = self.driver.paths(job.spec.uuid)
        disk_socket = paths.run_dir / "mig-disk.sock"
        memory_socket = paths.run_dir / "mig-mem.sock"
        watch = ForecastWatch(lambda forecast: self._report_forecast(job, forecast))
        tunnels = [
            open_tunnel(
                address=job.address,
                local_path=local,
                ticket=job.tickets[name],
                secret=self.node.config.dwcp_secret,
                source_node=self.node.config.name,
                streams=job.streams,
                control=job.control,
                reporter=watch.tunnel_reporter(name),
                link_outage_seconds=self.node.config.link_outage_seconds,
            )
            for name, local in (("disk", disk_socket), ("memory", memory_socket))
        ]
        job_id = f"mig-{job.migration_id[:8]}"
        watch.profile_ram(self.driver.status(job.spec.uuid).pid, job.spec.memory_mb)
        try:
            with self.driver.job_session(job.spec.uuid) as qmp:
                try:
                    qmp_steps.mirror_and_migrate(
                        qmp,
                        job,
                        job_id=job_id,
                        disk_socket=disk_socket,
                        memory_socket=memory_socket,
                        accelerator=self.driver.accelerator,
                        watch=watch,
                        connect_timeout=self.node.config.link_outage_seconds + CONNECT_MARGIN_SECONDS,
                        on_memory_phase=lambda: self.node.report(
                            job.migration_id, "source", "phase", "memory"
                        ),
                    )
                except BaseException as exc:
                    qmp_steps.undo_source(qmp, job_id, resume=job.knobs.force_complete)
                    cut = next(
                        (t.failure for t in tunnels if t.failure and t.failure.code == "link_outage"), None
                    )
                    if cut is not None and not isinstance(exc, MigrationAborted):
                        raise cut from exc  # QEMU only saw its stream end: say why
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
        self.node.report(
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

    def _report_forecast(self, job: SendJob, forecast: Forecast) -> None:
        """The verdict, to the control plane (whose ``on_no_convergence`` policy acts on a "no")."""
        self.node.report(
            job.migration_id,
            "source",
            "forecast",
            forecast.reason,
            stats={
                "converging": forecast.converging,
                "converging_reason": forecast.reason,
                "memory_passes": forecast.passes,
            },
        )

    def _offer_memory(self, qmp: QmpSession, job: SendJob) -> None:
        """Send the paused source's RAM digest and act on the destination's verdict.

        On ``mismatch`` the destination stopped its copy before it ran: resume this one and fail.
        Anything else leaves the source paused, as before the check existed: the destination resumes
        (verified or not) and the control plane settles the rest.
        """
        wait = memory_check_wait(job.spec.memory_mb)
        digest = None
        if self.node.verifies_memory():
            try:
                digest = memory_digest(
                    qmp,
                    job.spec.memory_mb,
                    pid=self.driver.status(job.spec.uuid).pid,
                    scratch=self.driver.paths(job.spec.uuid).run_dir,
                )
            except QemuError as exc:
                logger.warning("migration %s: source memory digest failed: %s", job.migration_id, exc)
        if not memory_check.offer(self.node.redis, job.migration_id, digest, wait) or digest is None:
            return
        verdict = memory_check.wait_verdict(self.node.redis, job.migration_id, wait * 2)
        if verdict is Verdict.MISMATCH:
            qmp.execute("cont")
            raise MemoryMismatch(
                "the destination's memory check failed (QEMU did not deliver every guest write); "
                "the source resumed",
                cause="relayed",
            )
        if verdict is None:
            logger.warning("migration %s: no memory check verdict from the destination", job.migration_id)

    def abort(self, request: contract.MigrationAbort) -> None:
        """Stop a send of this migration running here, and leave the VM as it was (``restart``: running)."""
        migration_id, restart = request["migration_id"], request.get("restart", False)
        spec = VmSpec.from_dict(request["vm"])

        def work() -> None:
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
            if self.node.markers.names(spec.uuid, migration_id, "source"):
                self.node.markers.remove(spec.uuid)
            detail = "source left running" if restart else "source untouched"
            self.node.report(migration_id, "source", "aborted", detail)

        with self.node.vm_lock(spec.uuid):
            self.node.guarded(migration_id, "source", work)

    def _handed_over(self, uuid: str) -> bool:
        """Whether this QEMU migrated its guest out (run state ``postmigrate``).

        Not ``query-migrate``: a VM that arrived by migration reports its incoming one as completed.
        """
        try:
            return bool(self.driver.execute(uuid, "query-status").get("status") == "postmigrate")
        except QemuError:
            return False

    def cleanup(self, request: contract.MigrationCleanup) -> None:
        """After the switch: remove this node's copy, if the marker says it is this migration's source."""
        migration_id = request["migration_id"]
        spec = VmSpec.from_dict(request["vm"])

        def work() -> None:
            if not self.node.markers.names(spec.uuid, migration_id, "source"):
                self.node.report(migration_id, "source", "cleaned", "nothing to clean")
                return
            self.driver.delete(spec.uuid)
            self.node.network.detach(spec.uuid)  # only now: until the switch the guest ran here
            self.node.report(migration_id, "source", "cleaned", "source copy removed")

        with self.node.vm_lock(spec.uuid):
            self.node.guarded(migration_id, "source", work)
