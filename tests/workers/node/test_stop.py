"""`make stop` (workers/node/stop.py) on a var directory like make run's: a leftover process of make run,
a running VM and a migration destination waiting with ``-incoming defer`` are all ended."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.workers.qemu.conftest import guest_spec, sweep, tcg_settings, testguest
from workers.qemu import QemuDriver, VmSpec, VmState
from workers.qemu.process import is_alive

ROOT = Path(__file__).resolve().parents[3]

__all__ = ["guest_spec", "testguest"]  # fixtures: the test guest's specs


@pytest.fixture
def var_dir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="ncs-", dir="/tmp"))  # short: QMP socket paths
    yield directory
    sweep(directory / "nodes" / "node1")
    sweep(directory / "nodes" / "node2")
    shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.qemu
def test_make_stop_ends_make_runs_leftover_processes_and_every_local_vm(
    var_dir: Path, guest_spec: Callable[..., VmSpec]
):
    env = os.environ | {"NOVACRON_VAR_DIR": str(var_dir), "NODE_POWERDOWN_TIMEOUT": "1"}
    # A Procfile line honcho left behind: scripts/logged.py and its command, in a group of their own.
    leftover = subprocess.Popen(
        [sys.executable, "scripts/logged.py", "leftover", "sleep", "600"], cwd=ROOT, env=env,
        start_new_session=True,
    )  # fmt: skip
    with QemuDriver(tcg_settings(var_dir / "nodes" / "node1")) as node1:
        running = node1.create(guest_spec()).uuid
        node1.start(running)
    with QemuDriver(tcg_settings(var_dir / "nodes" / "node2")) as node2:
        waiting = node2.create(guest_spec()).uuid
        node2.start(waiting, incoming=True)
        assert node2.status(waiting).qemu_status == "inmigrate"
    qemus = {
        running: (var_dir / "nodes" / "node1" / "run" / running),
        waiting: (var_dir / "nodes" / "node2" / "run" / waiting),
    }
    pids = {uuid: int((run_dir / "qemu.pid").read_text()) for uuid, run_dir in qemus.items()}

    result = subprocess.run(
        ["make", "-s", "stop"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert leftover.wait(timeout=10) == 128 + signal.SIGTERM  # its command ended by the group's SIGTERM
    assert "stopped 1 process(es) of make run" in result.stdout
    assert "a migration destination still waiting (-incoming defer)" in result.stdout
    for uuid, run_dir in qemus.items():
        assert not is_alive(pids[uuid], str(run_dir / "qmp.sock")), f"QEMU of {uuid} still runs"
    with QemuDriver(tcg_settings(var_dir / "nodes" / "node1")) as node1:
        assert node1.status(running).state is VmState.STOPPED
        assert "quit" in node1.status(running).reason  # the test guest ignores ACPI: quit after 1 s

    again = subprocess.run(
        ["make", "-s", "stop"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
    )
    assert again.returncode == 0 and "nothing of make run was running" in again.stdout
