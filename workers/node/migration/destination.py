"""The destination's side of a migration: prepare, the switch (live) or finish (cold), abort.

Live: a QEMU waits with ``-incoming defer -S`` behind an NBD export of its empty disk; a watcher
thread resumes the guest once its incoming migration completed and the memory check passed, and
reports the switch. Cold: the disk file arrives over DWCP and ``finish`` defines (and starts) the VM.
A copy is only ever removed while its marker names this migration as its destination.
NICs: live, the taps, bridge and peers are wired before the incoming QEMU starts, and the guest's MACs
are announced (QMP ``announce-self``) once it runs, so the overlay learns where it is now; cold, they
are wired by ``finish``; an aborted copy's taps go with it.
"""

import contextlib
import logging
import threading
import time
from typing import Any

from workers import contract
from workers.dwcp.files import JOURNAL_SUFFIX, PART_SUFFIX
from workers.qemu import QemuError, QmpError, QmpSession, QmpTimeout, VmSpec
from workers.qemu.memory import memory_digest

from . import memory_check, qmp_steps
from .context import NodeMigrations
from .memory_check import MEMORY_CHECK_MIN_WAIT, MemoryMismatch, Verdict, memory_check_wait

logger = logging.getLogger(__name__)

INCOMING_TIMEOUT = 6 * 3600.0
WATCHER_READY_TIMEOUT = 30.0  # for the watcher's own QMP monitor, before the migration may start


class Destination:
    """Receives VMs on this node."""

    def __init__(self, node: NodeMigrations) -> None:
        self.node = node
        self.driver = node.driver

    def prepare(self, request: contract.MigrationPrepare) -> None:
        migration_id = request["migration_id"]
        spec = VmSpec.from_dict(request["vm"])
        if self.node.markers.redelivered(spec.uuid, migration_id, "dest"):
            return
        with self.node.vm_lock(spec.uuid):
            self.node.guarded(
                migration_id,
                "dest",
                lambda: self._prepare(migration_id, spec, request["vm"], request["mode"]),
            )

    def _prepare(
        self, migration_id: str, spec: VmSpec, vm: contract.VmDescription, mode: contract.MigrationMode
    ) -> None:
        markers = self.node.markers
        paths = self.driver.paths(spec.uuid)
        if paths.spec.exists() and markers.role(spec.uuid) == "source":
            # The copy this node sent away in an earlier migration, its cleanup still queued behind this
            # task: the control plane records the VM elsewhere, so the leftover goes now.
            logger.info("VM %s: removing the leftover source copy of an earlier migration", spec.uuid)
            self.driver.delete(spec.uuid)
        if paths.spec.exists() and not markers.names(spec.uuid, migration_id, "dest"):
            raise QemuError(
                f"VM {spec.uuid} already exists on {self.node.config.name}; refusing to overwrite it"
            )
        markers.write(spec.uuid, migration_id, "dest")
        if mode == "cold":
            paths.disk.unlink(missing_ok=True)
            target = str(paths.disk.relative_to(self.node.config.data_dir))
            self.node.report(
                migration_id, "dest", "prepared", "ready to receive the disk", targets={"disk": target}
            )
            return
        self.node.network.attach(spec.uuid, vm)
        self.driver.create(spec)
        self.driver.start(spec.uuid, incoming=True)
        nbd = paths.run_dir / "nbd.sock"
        incoming = paths.run_dir / "incoming.sock"
        for stale in (nbd, incoming):
            stale.unlink(missing_ok=True)

        def execute(command: str, arguments: dict[str, Any] | None = None) -> Any:
            return self.driver.execute(spec.uuid, command, arguments)

        qmp_steps.export_incoming_disk(execute, nbd)
        # The watcher holds the second monitor before the migration can start, so no event is missed.
        ready = threading.Event()
        watcher = threading.Thread(
            target=self.node.guarded,
            args=(migration_id, "dest", lambda: self._watch_incoming(migration_id, spec, ready)),
            name=f"incoming-{spec.uuid[:8]}",
            daemon=True,
        )
        watcher.start()
        if not ready.wait(WATCHER_READY_TIMEOUT):
            raise QemuError("could not open the destination's job monitor")
        execute("migrate-incoming", {"uri": f"unix:{incoming}"})
        run_root = self.node.config.data_dir / "run"
        targets = {"disk": str(nbd.relative_to(run_root)), "memory": str(incoming.relative_to(run_root))}
        self.node.report(migration_id, "dest", "prepared", "incoming QEMU waiting", targets=targets)

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
                    if not self.node.markers.names(uuid, migration_id, "dest"):
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
            qmp_steps.announce(qmp)
            memory_check.answer(self.node.redis, migration_id, verdict, MEMORY_CHECK_MIN_WAIT)
            qmp_steps.release_incoming_disk(qmp)
        self.node.markers.remove(uuid)
        self.node.report(
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
            if self.node.verifies_memory():
                own = memory_digest(qmp, spec.memory_mb, pid=pid, scratch=scratch)
            offer = memory_check.wait_offer(self.node.redis, migration_id, wait)
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
        if not memory_check.answer(self.node.redis, migration_id, Verdict.MISMATCH, MEMORY_CHECK_MIN_WAIT):
            logger.error("migration %s: could not tell the source of the memory mismatch", migration_id)

    def finish(self, request: contract.MigrationFinish) -> None:
        """Cold: define the VM around the received disk and start it if it was running."""
        migration_id, start = request["migration_id"], request["start"]
        spec = VmSpec.from_dict(request["vm"])

        def work() -> None:
            if not self.node.markers.names(spec.uuid, migration_id, "dest"):
                raise QemuError("no prepared copy of this migration here")
            self.node.network.attach(spec.uuid, request["vm"])
            self.driver.create(spec)  # the received disk is in place: this only records the VM
            if start:
                self.driver.start(spec.uuid)
            self.node.markers.remove(spec.uuid)
            self.node.report(migration_id, "dest", "switched", "started" if start else "defined (stopped)")

        self.node.guarded(migration_id, "dest", work)

    def abort(self, request: contract.MigrationAbort) -> None:
        """Remove this node's copy, if the marker says it is this migration's destination."""
        migration_id = request["migration_id"]
        spec = VmSpec.from_dict(request["vm"])

        def work() -> None:
            if self.node.markers.names(spec.uuid, migration_id, "dest"):
                remove_copy(self.node, spec.uuid)
                self.node.report(migration_id, "dest", "aborted", "destination copy removed")
            else:
                self.node.report(migration_id, "dest", "aborted", "nothing of this migration here")

        with self.node.vm_lock(spec.uuid):
            self.node.guarded(migration_id, "dest", work)


def remove_copy(node: NodeMigrations, uuid: str) -> None:
    """Remove a destination copy: the VM, its NICs, and what the DWCP receiver kept of an interrupted
    disk transfer (its part and journal).

    Kept for a resume of the same transfer, but an aborted migration will not resume: left behind
    they fill the disk (found by the 'destination disk full' fault test: the partial file kept the
    full filesystem full after the rollback).
    """
    driver = node.driver
    driver.delete(uuid)
    node.network.detach(uuid)
    disk = driver.paths(uuid).disk
    # The journal's scratch copy too: a journal write that hit ENOSPC leaves it behind.
    for suffix in (PART_SUFFIX, JOURNAL_SUFFIX, f"{JOURNAL_SUFFIX}.tmp"):
        disk.with_name(f".{disk.name}{suffix}").unlink(missing_ok=True)
