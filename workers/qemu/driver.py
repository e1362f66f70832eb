"""`QemuDriver`: the lifecycle of the VMs on one node (create, start, stop, reboot, status, delete).

Rules it keeps:

* Every operation is idempotent, so a retried or duplicated Celery task is harmless: creating an
  existing VM makes no second disk, starting a running VM starts no second QEMU, stopping or deleting
  a stopped or absent VM succeeds.
* Operations on one VM serialize on an ``flock`` in its run directory (across threads and processes);
  QEMU also locks its own pidfile, so two QEMUs can never run for one VM.
* QEMU runs daemonized and outlives the worker. Its state is read back from the run directory (pidfile,
  /proc, QMP), never from memory, so a new driver instance after a restart sees what the old one saw:
  `discover` lists the VMs and reconnects QMP to the live ones.
* QEMU serves one client per QMP monitor, so the driver holds no session between operations: each
  operation connects to ``qmp.sock``, runs its commands and disconnects, and any number of worker
  processes can share a VM. Long jobs that watch events (live migration) get their own monitor,
  ``qmp-jobs.sock``, through `QemuDriver.job_session`, so they never block status queries.
* A VM's NICs are taps the node creates (and bridges) before QEMU starts, named with the node's
  ``device_tag`` (`workers.net.names`); the driver only checks that they exist in its network
  namespace, so QEMU never makes a fresh, unbridged tap of its own. A driver without a tag refuses
  VMs with NICs.
* A VM with a cloud-init seed gets its seed drive rebuilt from the spec before every QEMU start
  (`workers.qemu.seed`: the same spec gives the same bytes), so a migration's destination, a restart
  and a cold move all find it; it lives in the run directory and goes with it.
* How the last run ended is written to ``exit.json`` when the driver ends it (powerdown, quit, kill).
  QEMU deletes its pidfile when it exits normally, so a leftover pidfile without a live process means
  it was killed or crashed. A daemonized QEMU is not our child and its exit status cannot be collected:
  the reason says how it ended instead, with the last lines of its serial console.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from workers.contract import HypervisorFacts
from workers.qemu.accel import (
    Accelerator,
    ProbeResult,
    cached_probe_kvm,
    resolve_accelerator,
)
from workers.qemu.cmdline import qemu_command, tap_names
from workers.qemu.errors import (
    DataDirError,
    InvalidSpec,
    NicsUnsupported,
    QemuError,
    QemuStartError,
    QmpError,
    QmpProtocolError,
    VmNotFound,
    VmNotRunning,
)
from workers.qemu.layout import NodeLayout, VmPaths
from workers.qemu.process import is_alive, kill_hard, read_pid, wait_gone
from workers.qemu.qmp import EventLoopThread, QmpSession
from workers.qemu.seed import write_seed
from workers.qemu.settings import DriverSettings
from workers.qemu.spec import DiskImage, VmSpec
from workers.qemu.status import VmState, VmStatus, log_tail, status_from_query
from workers.qemu.tools import QemuTools

logger = logging.getLogger(__name__)

KILL_TIMEOUT = 5.0
DEVICE_TAG = re.compile(r"[0-9a-f]{4}")  # workers.net.names.node_tag


class QemuDriver:
    """Runs the VMs of one node's data directory. Close it (or use ``with``) to stop its QMP thread.

    ``device_tag`` is the node's tag in its taps' names (`workers.net.names.node_tag`); the default ""
    means this driver cannot attach NICs.
    """

    def __init__(self, settings: DriverSettings, device_tag: str = "") -> None:
        if device_tag and not DEVICE_TAG.fullmatch(device_tag):
            raise ValueError(f"device_tag must be four lower-case hex digits (node_tag), not {device_tag!r}")
        self.device_tag = device_tag
        self.settings = settings
        self.layout = NodeLayout(settings.data_dir)
        self.tools = QemuTools.locate(settings.qemu_system, settings.qemu_img)
        self.layout.ensure()
        self._accelerator: Accelerator | None = None
        self._loop = EventLoopThread()

    def __enter__(self) -> QemuDriver:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the QMP event-loop thread (idempotent); the QEMU processes keep running."""
        self._loop.close()

    # ----------------------------------------------------------------- node

    @property
    def accelerator(self) -> Accelerator:
        """The accelerator VMs start with (the setting, or the cached probe's verdict for auto)."""
        if self._accelerator is None:
            self._accelerator = resolve_accelerator(
                self.settings.accelerator,
                self.tools,
                self.layout.probe_cache,
                cpu_model=self.settings.cpu_model_for(Accelerator.KVM),
                timeout=self.settings.probe_timeout,
            )
        return self._accelerator

    def kvm_probe(self) -> ProbeResult:
        """The (cached) KVM probe result for this node."""
        return cached_probe_kvm(
            self.tools,
            self.layout.probe_cache,
            cpu_model=self.settings.cpu_model_for(Accelerator.KVM),
            timeout=self.settings.probe_timeout,
        )

    def node_facts(self) -> HypervisorFacts:
        """CPU count, memory, free disk of the data dir, QEMU version and KVM usability."""
        self.layout.ensure()
        probe = self.kvm_probe()
        try:
            free_bytes = shutil.disk_usage(self.layout.data_dir).free
        except OSError as exc:
            raise DataDirError(f"cannot read the free space of {self.layout.data_dir}: {exc}") from exc
        return {
            "cpu_count": os.cpu_count() or 1,
            "memory_mb": psutil.virtual_memory().total // (1024 * 1024),
            "disk_free_gb": round(free_bytes / 1024**3, 2),
            "data_dir": str(self.layout.data_dir),
            "qemu_version": probe.qemu_version,
            "kvm_usable": probe.kvm_usable,
            "kvm_probe_reason": probe.reason,
            "accelerator": str(self.accelerator),
        }

    # ------------------------------------------------------------ lifecycle

    def create(self, spec: VmSpec) -> VmStatus:
        """Make the VM's disk and run directory; a repeat with the same spec changes nothing."""
        self.tap_names(spec)  # refuses NICs when this driver cannot attach them
        paths = self.layout.vm(spec.uuid)
        made_run_dir = not paths.run_dir.exists()
        paths.run_dir.mkdir(mode=0o700, exist_ok=True)
        with self._locked(paths):
            if paths.spec.exists():
                existing = self._load_spec(paths)
                if existing != spec:
                    raise InvalidSpec(
                        f"VM {spec.uuid} already exists on this node with a different spec; "
                        "delete it first or use a new uuid"
                    )
                return self.status(spec.uuid)
            made_disk = False
            try:
                _check_image_files(spec)
                if not paths.disk.exists():  # a disk put in place beforehand (cold migration) is kept
                    self._create_disk(spec, paths)
                    made_disk = True
                _write_json_atomically(paths.spec, spec.to_dict())
            except BaseException:
                # A failed create removes what it made, and only that (spec.json is written last).
                _temporary_disk(paths).unlink(missing_ok=True)
                if made_disk:
                    paths.disk.unlink(missing_ok=True)
                if made_run_dir:
                    shutil.rmtree(paths.run_dir, ignore_errors=True)
                raise
        return self.status(spec.uuid)

    def start(self, uuid: str, *, incoming: bool = False) -> VmStatus:
        """Start QEMU for a created VM, or return the status of the one already running.

        ``incoming=True`` starts it as a live-migration destination: paused, in state ``inmigrate``,
        waiting for QMP ``migrate-incoming``.
        """
        paths = self._existing(uuid)
        with self._locked(paths):
            if self._live_pid(paths) is not None:
                return self.status(uuid)
            spec = self._load_spec(paths)
            _check_image_files(spec)
            if not paths.disk.exists():
                raise VmNotFound(
                    f"the disk of VM {uuid} ({paths.disk}) is missing; delete and re-create the VM"
                )
            for stale in (
                paths.pidfile,
                paths.qmp_socket,
                paths.jobs_socket,
                paths.console_socket,
                paths.guest_socket,
                paths.exit_record,
            ):
                stale.unlink(missing_ok=True)
            for current, previous in (
                (paths.serial_log, paths.previous_serial_log),
                (paths.guest_log, paths.previous_guest_log),
                (paths.qemu_log, paths.previous_qemu_log),
            ):
                if current.exists():
                    current.replace(previous)
            self._launch(spec, paths, incoming=incoming)
        return self.status(uuid)

    def stop(self, uuid: str, *, powerdown_timeout: float | None = None) -> VmStatus:
        """ACPI powerdown, wait ``powerdown_timeout`` s (default: the setting), then `quit`, then SIGKILL."""
        paths = self._existing(uuid)
        timeout = self.settings.powerdown_timeout if powerdown_timeout is None else powerdown_timeout
        with self._locked(paths):
            pid = self._live_pid(paths)
            if pid is None:
                return self.status(uuid)
            marker = str(paths.qmp_socket)
            try:
                self._qmp_call(paths, "system_powerdown")
            except QmpError as exc:
                logger.warning("VM %s: system_powerdown failed (%s); going straight to quit", uuid, exc)
                timeout = 0.0
            if wait_gone(pid, marker, timeout):
                self._record_exit(paths, "stopped: the guest powered off after an ACPI powerdown request")
            else:
                self._quit_or_kill(uuid, paths, pid, f"the guest ignored ACPI powerdown for {timeout:g} s")
        return self.status(uuid)

    def reboot(self, uuid: str) -> VmStatus:
        """Hard-reset the guest (QMP ``system_reset``); the QEMU process stays the same."""
        paths = self._existing(uuid)
        with self._locked(paths):
            if self._live_pid(paths) is None:
                raise VmNotRunning(f"cannot reboot VM {uuid}: it is not running; start it instead")
            self._qmp_call(paths, "system_reset")
        return self.status(uuid)

    def delete(self, uuid: str) -> None:
        """Kill QEMU if it runs, then remove the disk and run files; deleting an absent VM is a no-op."""
        paths = self.layout.vm(uuid)
        if paths.run_dir.exists():
            with self._locked(paths):
                pid = self._live_pid(paths)
                if pid is not None:
                    self._quit_or_kill(uuid, paths, pid, "the VM is being deleted")
                shutil.rmtree(paths.run_dir, ignore_errors=True)
        paths.disk.unlink(missing_ok=True)
        _temporary_disk(paths).unlink(missing_ok=True)
        if paths.run_dir.exists() or paths.disk.exists():
            raise QemuError(f"could not remove all files of VM {uuid} under {self.layout.data_dir}")

    # --------------------------------------------------------------- status

    def status(self, uuid: str) -> VmStatus:
        """RUNNING/PAUSED from ``query-status`` while QEMU lives; STOPPED/DEAD with the reason otherwise."""
        paths = self._existing(uuid)
        pid = self._live_pid(paths)
        if pid is not None:
            try:
                answer = self._qmp_call(paths, "query-status")
            except QmpError as exc:
                if self._live_pid(paths) is None:  # it exited while we asked
                    return self._stopped_status(uuid, paths)
                return VmStatus(
                    uuid, VmState.UNKNOWN, f"QEMU (pid {pid}) is alive but QMP failed: {exc}", pid
                )
            return status_from_query(uuid, pid, answer)
        return self._stopped_status(uuid, paths)

    def discover(self) -> list[VmStatus]:
        """Every VM in the run directory, reconnecting QMP to those whose QEMU is alive."""
        statuses = []
        for uuid in self.layout.vm_uuids():
            paths = self.layout.vm(uuid)
            if not paths.spec.exists():
                logger.warning(
                    "run directory %s has no spec.json (interrupted create); skipped", paths.run_dir
                )
                continue
            statuses.append(self.status(uuid))
        return statuses

    def paths(self, uuid: str) -> VmPaths:
        """The files of a VM (disk, QMP socket, serial log, ...), whether or not they exist yet."""
        return self.layout.vm(uuid)

    # -------------------------------------------------- raw QMP (migration)

    def execute(
        self,
        uuid: str,
        command: str,
        arguments: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> Any:
        """Run one QMP command on a running VM and return QEMU's ``return`` value."""
        paths = self._existing(uuid)
        if self._live_pid(paths) is None:
            raise VmNotRunning(f"cannot run QMP {command!r} on VM {uuid}: it is not running")
        return self._qmp_call(paths, command, arguments, timeout=timeout)

    @contextlib.contextmanager
    def job_session(self, uuid: str) -> Iterator[QmpSession]:
        """A QMP session on the VM's jobs monitor, held for a long job that waits for events.

        Only one job session per VM can be open at a time (QEMU serves one client per monitor);
        lifecycle operations and status use the other monitor and are not blocked by it.
        """
        paths = self._existing(uuid)
        if self._live_pid(paths) is None:
            raise VmNotRunning(f"VM {uuid} is not running: it has no QMP monitor")
        with self._connected(paths.jobs_socket) as session:
            yield session

    # -------------------------------------------------------------- helpers

    def _existing(self, uuid: str) -> VmPaths:
        paths = self.layout.vm(uuid)
        if not paths.spec.exists():
            raise VmNotFound(f"no VM {uuid} on this node (no {paths.spec}); create it first")
        return paths

    def _load_spec(self, paths: VmPaths) -> VmSpec:
        try:
            return VmSpec.from_dict(json.loads(paths.spec.read_text()))
        except (OSError, ValueError) as exc:
            raise InvalidSpec(f"cannot read {paths.spec}: {exc}; delete and re-create the VM") from exc

    @contextlib.contextmanager
    def _locked(self, paths: VmPaths) -> Iterator[None]:
        with open(paths.lock, "a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)

    def _live_pid(self, paths: VmPaths) -> int | None:
        pid = read_pid(paths.pidfile)
        return pid if pid is not None and is_alive(pid, str(paths.qmp_socket)) else None

    @contextlib.contextmanager
    def _connected(self, socket_path: Path) -> Iterator[QmpSession]:
        session = QmpSession(socket_path, self._loop, timeout=self.settings.qmp_timeout)
        session.connect()
        try:
            yield session
        finally:
            with contextlib.suppress(QmpError):
                session.close()

    def _qmp_call(
        self,
        paths: VmPaths,
        command: str,
        arguments: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> Any:
        with self._connected(paths.qmp_socket) as session:
            return session.execute(command, arguments, timeout=timeout)

    def _create_disk(self, spec: VmSpec, paths: VmPaths) -> None:
        # qemu-img writes to a temporary name that is renamed into place, so a create interrupted
        # half-way never leaves a disk that a retry would take as finished.
        temporary = _temporary_disk(paths)
        temporary.unlink(missing_ok=True)
        if isinstance(spec.image, DiskImage):
            self.tools.img_create_overlay(temporary, spec.image.path, spec.image.format)
        else:
            self.tools.img_create_empty(temporary, spec.disk_gb)
        os.chmod(temporary, 0o600)  # guest data: readable by the worker's user only
        temporary.replace(paths.disk)

    def tap_names(self, spec: VmSpec) -> list[str]:
        """The taps the node must create (and bridge) for the spec's NICs before starting it, in order."""
        return tap_names(spec, self.device_tag)

    def _launch(self, spec: VmSpec, paths: VmPaths, *, incoming: bool) -> None:
        accelerator = self.accelerator
        command = qemu_command(
            self.tools.system,
            spec,
            paths,
            accelerator=accelerator,
            cpu_model=self.settings.cpu_model_for(accelerator),
            device_tag=self.device_tag,
            incoming=incoming,
        )
        for index, tap in enumerate(self.tap_names(spec)):
            try:
                socket.if_nametoindex(tap)
            except OSError:
                raise NicsUnsupported(
                    f"the tap {tap} of NIC {index} ({spec.nics[index].mac}) of VM {spec.uuid} does not "
                    "exist; the node creates it (in the network's bridge) before starting the VM"
                ) from None
        if spec.seed is not None:
            try:
                write_seed(spec, paths.seed)
            except OSError as exc:
                raise QemuStartError(
                    f"cannot write the seed drive of VM {spec.uuid}: {exc.strerror}"
                ) from exc
        # stderr goes to a file, not a pipe: the daemonized QEMU inherits it, and a pipe would keep us
        # waiting for an EOF that only comes when the VM ends.
        with tempfile.TemporaryFile() as stderr:
            try:
                result = subprocess.run(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                    timeout=self.settings.start_timeout,
                    check=False,
                    umask=0o077,  # files QEMU creates before daemonizing: the worker's user only
                )
            except subprocess.TimeoutExpired as exc:
                raise QemuStartError(
                    f"QEMU for VM {spec.uuid} did not daemonize within {self.settings.start_timeout:g} s"
                ) from exc
            stderr.seek(0)
            # With -D, QEMU sends its error messages to the log file rather than to stderr.
            message = " / ".join(
                (*stderr.read().decode(errors="replace").strip().splitlines(), *log_tail(paths.qemu_log))
            )
        if result.returncode != 0:
            raise QemuStartError(
                f"QEMU for VM {spec.uuid} failed to start (exit {result.returncode}): {message}"
            )
        for socket_path in (paths.qmp_socket, paths.jobs_socket, paths.console_socket, paths.guest_socket):
            if not socket_path.exists():
                raise QemuStartError(f"QEMU for VM {spec.uuid} started but created no socket {socket_path}")
            os.chmod(socket_path, 0o600)
        # The daemonized QEMU switches to umask 027 before opening some files; tighten them as well.
        for log in (paths.serial_log, paths.guest_log, paths.qemu_log):
            if log.exists():
                os.chmod(log, 0o600)
        if message:
            logger.warning("VM %s: QEMU said while starting: %s", spec.uuid, message)

    def _quit_or_kill(self, uuid: str, paths: VmPaths, pid: int, why: str) -> None:
        marker = str(paths.qmp_socket)
        try:
            self._qmp_call(paths, "quit")
        except QmpProtocolError:
            pass  # the session may close before the reply arrives: QEMU is exiting
        except QmpError as exc:
            logger.warning("VM %s: quit failed (%s); killing QEMU", uuid, exc)
        if wait_gone(pid, marker, self.settings.quit_timeout):
            self._record_exit(paths, f"stopped: QEMU was told to quit ({why})")
            return
        if kill_hard(pid, marker, KILL_TIMEOUT):
            self._record_exit(
                paths, f"stopped: QEMU was killed after ignoring quit for {self.settings.quit_timeout:g} s"
            )
            return
        raise QemuError(f"QEMU of VM {uuid} (pid {pid}) survived quit and SIGKILL; check the host")

    def _record_exit(self, paths: VmPaths, reason: str) -> None:
        if paths.run_dir.exists():
            _write_json_atomically(paths.exit_record, {"reason": reason, "at": datetime.now(UTC).isoformat()})

    def _stopped_status(self, uuid: str, paths: VmPaths) -> VmStatus:
        serial = log_tail(paths.serial_log)
        messages = log_tail(paths.qemu_log)
        try:
            recorded = json.loads(paths.exit_record.read_text())
            return VmStatus(uuid, VmState.STOPPED, str(recorded["reason"]), None, None, serial, messages)
        except (OSError, ValueError, KeyError, TypeError):
            pass  # no usable record: look at what the process left behind
        last_message = f"; QEMU's last message: {messages[-1]}" if messages else ""
        stale_pid = read_pid(paths.pidfile)
        if stale_pid is not None:
            # QEMU removes its pidfile when it exits normally; a leftover one means it did not.
            reason = (
                f"QEMU (pid {stale_pid}) is gone without a shutdown: it was killed or crashed{last_message} "
                "(see the last serial lines); start the VM again or delete it"
            )
            return VmStatus(uuid, VmState.DEAD, reason, None, None, serial, messages)
        if not paths.serial_log.exists():
            return VmStatus(uuid, VmState.STOPPED, "created, never started")
        reason = (
            f"QEMU exited on its own{last_message}"
            if messages
            else "QEMU exited cleanly on its own (the guest powered off, or a QMP client told it to quit)"
        )
        return VmStatus(uuid, VmState.STOPPED, reason, None, None, serial, messages)


def _check_image_files(spec: VmSpec) -> None:
    image = spec.image
    required = (
        [image.path]
        if isinstance(image, DiskImage)
        else [image.kernel_path] + ([image.initrd_path] if image.initrd_path else [])
    )
    for path in required:
        if not path.is_file():
            raise InvalidSpec(f"image file {path} does not exist on this node; copy the image here first")


def _temporary_disk(paths: VmPaths) -> Path:
    return paths.disk.with_name(paths.disk.name + ".partial")


def _write_json_atomically(path: Path, data: Mapping[str, Any]) -> None:
    # Mode 0600: spec.json carries a seed's user data.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with os.fdopen(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as file:
        file.write(json.dumps(data, indent=2) + "\n")
    temporary.replace(path)
