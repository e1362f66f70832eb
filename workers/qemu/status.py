"""What the driver reports about a VM: `VmState`, `VmStatus`, and how QEMU's answers map onto them."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

SERIAL_TAIL_LINES = 10
SERIAL_TAIL_BYTES = 16 * 1024  # enough for the last lines, however long the log has grown
ANSI_ESCAPE = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|[A-Za-z])")  # SeaBIOS clears the screen with these
# QEMU run states (query-status "status") that mean the guest is not executing but QEMU is fine.
PAUSED_QEMU_STATES = frozenset(
    {"paused", "prelaunch", "inmigrate", "postmigrate", "finish-migrate", "suspended", "save-vm",
     "restore-vm", "debug", "colo", "shutdown"}
)  # fmt: skip
# QEMU run states that mean something went wrong inside the guest or with its storage.
FAULTED_QEMU_STATES = frozenset({"guest-panicked", "internal-error", "io-error", "watchdog"})


class VmState(StrEnum):
    """What a VM is doing, as far as this node can tell."""

    RUNNING = "running"  # QEMU alive, guest CPUs running
    PAUSED = "paused"  # QEMU alive, guest CPUs stopped (qemu_status says why)
    STOPPED = "stopped"  # no QEMU: never started, or ended cleanly
    DEAD = "dead"  # no QEMU, and nobody shut it down: killed or crashed
    UNKNOWN = "unknown"  # QEMU alive but QMP gave no usable answer


@dataclass(frozen=True)
class VmStatus:
    """A VM's state with the evidence behind it."""

    uuid: str
    state: VmState
    reason: str
    pid: int | None = None
    qemu_status: str | None = None  # query-status "status", when QEMU answered
    serial_tail: tuple[str, ...] = ()  # last lines of the serial console, for stopped/dead VMs
    qemu_messages: tuple[str, ...] = ()  # last lines QEMU itself logged, for stopped/dead VMs

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for reports to the control plane."""
        data = asdict(self)
        data["state"] = str(self.state)
        data["serial_tail"] = list(self.serial_tail)
        data["qemu_messages"] = list(self.qemu_messages)
        return data


def status_from_query(uuid: str, pid: int, answer: Any) -> VmStatus:
    """Interpret a ``query-status`` answer; anything malformed becomes UNKNOWN, never an exception."""
    if not isinstance(answer, dict) or not isinstance(answer.get("status"), str):
        return VmStatus(
            uuid,
            VmState.UNKNOWN,
            f"QEMU (pid {pid}) answered query-status with {answer!r}, not a status",
            pid,
        )
    qemu_status = answer["status"]
    if qemu_status == "running":
        return VmStatus(uuid, VmState.RUNNING, "running", pid, qemu_status)
    if qemu_status in FAULTED_QEMU_STATES:
        return VmStatus(uuid, VmState.PAUSED, f"guest stopped by a fault: {qemu_status}", pid, qemu_status)
    if qemu_status in PAUSED_QEMU_STATES:
        return VmStatus(uuid, VmState.PAUSED, f"paused ({qemu_status})", pid, qemu_status)
    return VmStatus(
        uuid, VmState.UNKNOWN, f"QEMU reports an unrecognised status {qemu_status!r}", pid, qemu_status
    )


def log_tail(log: Path) -> tuple[str, ...]:
    """The last non-empty lines of a serial console or QEMU log, without terminal escape codes."""
    try:
        with open(log, "rb") as handle:
            handle.seek(max(0, log.stat().st_size - SERIAL_TAIL_BYTES))
            text = handle.read().decode(errors="replace")
    except OSError:
        return ()
    lines = [ANSI_ESCAPE.sub("", line).strip() for line in text.splitlines()]
    return tuple(line for line in lines if line)[-SERIAL_TAIL_LINES:]
