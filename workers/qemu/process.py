"""Finding out whether a daemonized QEMU is alive, from its pidfile and /proc.

A pid alone is not proof: after a crash the pid may be reused, and an exited QEMU whose parent does
not reap it lingers as a zombie. A QEMU counts as alive when its pid runs, is not a zombie, and its
command line names this VM's QMP socket.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

POLL_INTERVAL = 0.05


def read_pid(pidfile: Path) -> int | None:
    """The pid QEMU wrote, or None when the file is missing, empty or garbled."""
    try:
        text = pidfile.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def is_alive(pid: int, marker: str) -> bool:
    """True when ``pid`` runs (not a zombie) and its command line contains ``marker``."""
    proc = Path("/proc") / str(pid)
    try:
        stat = (proc / "stat").read_text()
        cmdline = (proc / "cmdline").read_bytes()
    except OSError:
        return False
    # The state letter follows the parenthesised command name, which may itself contain ')'.
    state = stat[stat.rfind(")") + 2 : stat.rfind(")") + 3]
    return state not in ("Z", "X") and marker.encode() in cmdline


def wait_gone(pid: int, marker: str, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for the process to exit; True if it did."""
    deadline = time.monotonic() + timeout
    while is_alive(pid, marker):
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_INTERVAL)
    return True


def kill_hard(pid: int, marker: str, timeout: float) -> bool:
    """SIGKILL the process if it is still ours and alive; True once it is gone."""
    if is_alive(pid, marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return True
    return wait_gone(pid, marker, timeout)
