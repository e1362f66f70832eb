"""``python -m workers.node.stop [--report]``: end what `make run` leaves running on this machine.

A VM's QEMU outlives its node worker by design, and a migration cut short leaves the destination's
QEMU waiting with ``-incoming defer``. ``make stop`` ends, under ``$NOVACRON_VAR_DIR`` (default ``var``):

1. the processes of `make run` that still run (run-local.sh, honcho, web, Celery, Flower, node
   workers), known by the ``NOVACRON_VAR_DIR`` in their environment: SIGTERM, SIGKILL after a grace
   period. They go first, so that no node worker acts on a VM while it is being stopped;
2. every VM QEMU of the local nodes (``nodes/*``) through the QEMU driver: ACPI powerdown, ``quit``
   after ``NODE_POWERDOWN_TIMEOUT`` s, SIGKILL as the last resort. A QEMU whose guest is not running
   (a destination waiting for its migration) gets ``quit`` at once.

``--report`` changes nothing: it says what still runs and how to end it (run-local.sh on stop). The
Redis server scripts/ensure-redis.sh may have started is left alone: `make test` shares it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys
import time
from pathlib import Path

from workers.qemu import DriverSettings, QemuDriver, QemuError, VmState, VmStatus

# Command lines of the processes run-local.sh starts (honcho's `sh -c` lines name scripts/logged.py).
MAKE_RUN_COMMAND = re.compile(rb"run-local\.sh|honcho|scripts/logged\.py|granian|celery|-m\0workers\.node\0")
TERM_GRACE = 15.0  # seconds between SIGTERM and SIGKILL: Celery's warm shutdown finishes its tasks
POLL_INTERVAL = 0.1


def var_dir_from_env() -> Path:
    return Path(os.environ.get("NOVACRON_VAR_DIR", "var")).resolve()


def make_run_processes(var_dir: Path) -> list[int]:
    """Pids of `make run`'s processes for ``var_dir`` (never this process or its ancestors)."""
    marker = b"NOVACRON_VAR_DIR=" + str(var_dir).encode()
    excluded = _ancestors(os.getpid())
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) in excluded:
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue  # exited meanwhile, or another user's
        if marker in environ and MAKE_RUN_COMMAND.search(cmdline + b"\0"):
            pids.append(int(proc.name))
    return pids


def stop_processes(pids: list[int]) -> list[int]:
    """SIGTERM ``pids`` and their process groups, SIGKILL what is left after `TERM_GRACE`; the pids killed.

    Like honcho, each process's group is signalled: honcho starts every Procfile line in a group of its
    own, whose processes (scripts/logged.py's command) may not be in ``pids`` themselves.
    """
    _signal_all(pids, signal.SIGTERM)
    deadline = time.monotonic() + TERM_GRACE
    while time.monotonic() < deadline and any(process_running(pid) for pid in pids):
        time.sleep(POLL_INTERVAL)
    killed = [pid for pid in pids if process_running(pid)]
    _signal_all(killed, signal.SIGKILL)
    return killed


def node_drivers(var_dir: Path) -> list[tuple[str, QemuDriver]]:
    """A driver for each local node's data dir (``nodes/<name>``), by node name."""
    nodes = var_dir / "nodes"
    if not nodes.is_dir():
        return []
    timeout = float(os.environ.get("NODE_POWERDOWN_TIMEOUT", "5"))
    return [
        (data_dir.name, QemuDriver(DriverSettings(data_dir=data_dir, powerdown_timeout=timeout)))
        for data_dir in sorted(nodes.iterdir())
        if (data_dir / "run").is_dir()
    ]


def live_vms(driver: QemuDriver) -> list[VmStatus]:
    return [status for status in driver.discover() if status.pid is not None]


def describe(node: str, status: VmStatus) -> str:
    what = f"{node}: VM {status.uuid}, QEMU pid {status.pid}, {status.state}"
    if status.qemu_status == "inmigrate":
        return f"{what}: a migration destination still waiting (-incoming defer)"
    return f"{what} ({status.qemu_status})" if status.qemu_status else what


def stop_vm(driver: QemuDriver, status: VmStatus) -> VmStatus:
    # A guest that is not running cannot act on ACPI powerdown: quit at once.
    timeout = None if status.state is VmState.RUNNING else 0.0
    return driver.stop(status.uuid, powerdown_timeout=timeout)


def report(var_dir: Path) -> int:
    """Print the local VMs that still run and how to end them."""
    lines = []
    for node, driver in node_drivers(var_dir):
        with driver:
            lines += [describe(node, status) for status in live_vms(driver)]
    if lines:
        print(f"Still running (VMs outlive make run by design; data in {var_dir}/nodes):")
        print("\n".join(f"  {line}" for line in lines))
        print("End them with: make stop (ACPI powerdown, then quit)")
    return 0


def stop(var_dir: Path) -> int:
    """End `make run`'s leftover processes, then every local VM; 1 if a VM could not be ended."""
    pids = make_run_processes(var_dir)
    if pids:
        killed = stop_processes(pids)
        print(f"stopped {len(pids)} process(es) of make run" + (f" ({len(killed)} killed)" if killed else ""))
    vms = failures = 0
    for node, driver in node_drivers(var_dir):
        with driver:
            for status in live_vms(driver):
                vms += 1
                print(f"stopping {describe(node, status)}", flush=True)
                try:
                    print(f"  {stop_vm(driver, status).reason}")
                except QemuError as exc:
                    failures += 1
                    print(f"  could not stop it: {exc}", file=sys.stderr)
    if not pids and not vms:
        print(f"nothing of make run was running under {var_dir}")
    return 1 if failures else 0


def _ancestors(pid: int) -> set[int]:
    chain = set()
    while pid > 0 and pid not in chain:
        chain.add(pid)
        try:
            stat = (Path("/proc") / str(pid) / "stat").read_text()
        except OSError:
            break
        pid = int(stat[stat.rfind(")") + 2 :].split()[1])
    return chain


def process_running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


def _signal_all(pids: list[int], signum: signal.Signals) -> None:
    own_group = os.getpgrp()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            group = os.getpgid(pid)
            if group == own_group:
                os.kill(pid, signum)
            else:
                os.killpg(group, signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.node.stop", description=__doc__.split("\n")[0])
    parser.add_argument("--report", action="store_true", help="only say what still runs and how to end it")
    args = parser.parse_args(argv)
    var_dir = var_dir_from_env()
    return report(var_dir) if args.report else stop(var_dir)


if __name__ == "__main__":
    sys.exit(main())
