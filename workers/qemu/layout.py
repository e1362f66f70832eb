"""Where a node keeps its VMs: the on-disk layout under the data directory.

    DATA/disks/<uuid>.qcow2            the VM's disk (overlay on the image's base, or an empty qcow2)
    DATA/run/<uuid>/                   mode 0700, one per VM created on this node
        spec.json                      the VmSpec it was created from
        qmp.sock                       QMP monitor for lifecycle operations and status (mode 0600)
        qmp-jobs.sock                  second QMP monitor, for long jobs such as migration (mode 0600)
        serial.log, serial.log.1       serial console (ttyS0) of this run and of the previous one
        console.sock                   the serial console's input and output (mode 0600)
        guest.log, guest.log.1         guest channel (ttyS1) of this run and of the previous one
        guest.sock                     the guest channel's input and output (mode 0600)
        seed.iso                       the cloud-init NoCloud seed drive, VMs with a seed only (mode 0600)
        qemu.log, qemu.log.1           QEMU's own messages once daemonized (-D), this run and the previous
        qemu.pid                       written (and locked) by QEMU itself
        exit.json                      how the last run ended, when the driver knows
        lock                           flock taken by every driver operation on this VM
    DATA/accel-probe.json              cached result of the KVM probe

A unix socket path must fit in ``sun_path`` (108 bytes with the NUL), so the data directory path is
checked here rather than failing later inside QEMU.
"""

from __future__ import annotations

import os
import uuid as uuid_module
from dataclasses import dataclass
from pathlib import Path

from workers.qemu.errors import DataDirError, InvalidSpec

UNIX_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) minus the terminating NUL on Linux
UUID_LEN = 36


@dataclass(frozen=True)
class VmPaths:
    """The files of one VM."""

    disk: Path
    run_dir: Path

    @property
    def spec(self) -> Path:
        return self.run_dir / "spec.json"

    @property
    def qmp_socket(self) -> Path:
        return self.run_dir / "qmp.sock"

    @property
    def jobs_socket(self) -> Path:
        return self.run_dir / "qmp-jobs.sock"

    @property
    def serial_log(self) -> Path:
        """Everything the guest printed on its serial console (boot messages, a user's session)."""
        return self.run_dir / "serial.log"

    @property
    def console_socket(self) -> Path:
        """The serial console as a unix socket (mode 0600): what the guest prints, and its input. The
        user's console: a node-side multiplexer is its only client."""
        return self.run_dir / "console.sock"

    @property
    def previous_serial_log(self) -> Path:
        return self.run_dir / "serial.log.1"

    @property
    def guest_log(self) -> Path:
        """Everything the guest printed on its guest channel (the test guest's ticks and answers)."""
        return self.run_dir / "guest.log"

    @property
    def guest_socket(self) -> Path:
        """The guest channel, a second serial port (the guest's ``ttyS1``), as a unix socket (mode 0600):
        a machine-to-machine line channel kept apart from the user's console (the test guest's request
        protocol, `workers.guest`); unused by guests that do not open ``ttyS1``."""
        return self.run_dir / "guest.sock"

    @property
    def previous_guest_log(self) -> Path:
        return self.run_dir / "guest.log.1"

    @property
    def seed(self) -> Path:
        """The cloud-init seed drive (`workers.qemu.seed`), rebuilt from the spec before each start."""
        return self.run_dir / "seed.iso"

    @property
    def qemu_log(self) -> Path:
        return self.run_dir / "qemu.log"

    @property
    def previous_qemu_log(self) -> Path:
        return self.run_dir / "qemu.log.1"

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "qemu.pid"

    @property
    def exit_record(self) -> Path:
        return self.run_dir / "exit.json"

    @property
    def lock(self) -> Path:
        return self.run_dir / "lock"


@dataclass(frozen=True)
class NodeLayout:
    """The data directory of one node."""

    data_dir: Path

    @property
    def disks_dir(self) -> Path:
        return self.data_dir / "disks"

    @property
    def run_root(self) -> Path:
        return self.data_dir / "run"

    @property
    def probe_cache(self) -> Path:
        return self.data_dir / "accel-probe.json"

    def vm(self, uuid: str) -> VmPaths:
        """The files of VM ``uuid``; anything but a UUID is refused, so no path can escape the data dir."""
        canonical = canonical_uuid(uuid)
        if canonical is None:
            raise InvalidSpec(f"{uuid!r} is not a VM uuid")
        return VmPaths(disk=self.disks_dir / f"{canonical}.qcow2", run_dir=self.run_root / canonical)

    def ensure(self) -> None:
        """Create the directories and prove they are writable; raise `DataDirError` otherwise."""
        longest_socket = len(str(self.run_root.absolute())) + 1 + UUID_LEN + len("/qmp-jobs.sock")
        if longest_socket > UNIX_PATH_MAX:
            raise DataDirError(
                f"data dir {self.data_dir} is too long: QMP socket paths under it would be {longest_socket} "
                f"bytes, the limit for unix sockets is {UNIX_PATH_MAX}; choose a shorter path"
            )
        try:
            self.disks_dir.mkdir(parents=True, exist_ok=True)
            self.run_root.mkdir(parents=True, exist_ok=True)
            os.chmod(self.run_root, 0o700)
            for directory in (self.disks_dir, self.run_root):
                probe = directory / f".write-test-{os.getpid()}"
                probe.write_bytes(b"")
                probe.unlink()
        except OSError as exc:
            raise DataDirError(
                f"data dir {self.data_dir} is not writable ({exc.strerror or exc}); "
                "create it and give the node worker's user write access"
            ) from exc

    def vm_uuids(self) -> list[str]:
        """The uuids of the VMs that have a run directory, sorted."""
        if not self.run_root.is_dir():
            return []
        return sorted(
            entry.name
            for entry in self.run_root.iterdir()
            if entry.is_dir() and canonical_uuid(entry.name) == entry.name
        )


def canonical_uuid(text: str) -> str | None:
    """The lower-case hyphenated form of a UUID, or None when ``text`` is not one."""
    try:
        return str(uuid_module.UUID(text))
    except (ValueError, TypeError, AttributeError):
        return None
