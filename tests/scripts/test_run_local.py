"""`make run`'s script (scripts/run-local.sh) started for real: the environment's secrets win, and a
Ctrl-C ends every process it started.

It runs in a var directory of its own (NOVACRON_VAR_DIR, SQLite in it, the test guest linked in) on
free ports, so a developer's var/ and running `make run` are left alone.
"""

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.workers.qemu.conftest import GUEST_DIR, testguest
from workers.node.stop import process_running
from workers.qemu import KernelImage

ROOT = Path(__file__).resolve().parents[2]
PORTS = {
    "PORT": 18020,
    "FLOWER_PORT": 18021,
    "NODE1_DWCP_PORT": 18022,
    "NODE2_DWCP_PORT": 18023,
    "NODE1_VXLAN_PORT": 18024,
    "NODE2_VXLAN_PORT": 18025,
}
START_TIMEOUT = 240  # migrate on SQLite, collectstatic and six processes on a loaded 2-core machine
STOP_TIMEOUT = 60
ENV_PASSWORD = "from-the-environment-1"
FILE_PASSWORD = "from-secrets-env-1"

__all__ = ["testguest"]  # the session fixture building the guest image make run registers


@pytest.fixture
def var_dir(testguest: KernelImage) -> Iterator[Path]:
    # Short, under /tmp: the node data dirs hold QMP sockets (107-byte path limit).
    directory = Path(tempfile.mkdtemp(prefix="ncr-", dir="/tmp"))
    (directory / "images").symlink_to(GUEST_DIR.parent)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (honcho starts each process in a session of its own)."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        try:
            stat = (proc / "stat").read_text() if proc.name.isdigit() else ""
        except OSError:
            continue
        if stat:
            children.setdefault(int(stat[stat.rfind(")") + 2 :].split()[1]), []).append(int(proc.name))
    found: set[int] = set()
    pending = [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.add(child)
            pending.append(child)
    return found


def token_status(password: str) -> int:
    """The HTTP status of a token request for admin with ``password`` (0: nothing answers yet)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{PORTS['PORT']}/api/v1/auth/token/",
        data=json.dumps({"username": "admin", "password": password}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            assert "token" in json.loads(response.read())
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


@pytest.mark.integration
def test_make_run_logs_in_with_the_environments_password_and_ctrl_c_ends_every_process(var_dir: Path):
    (var_dir / "secrets.env").write_text(f"NOVACRON_ADMIN_PASSWORD={FILE_PASSWORD}\n")
    env = {key: value for key, value in os.environ.items()}
    for inherited in ("DATABASE_URL", "DJANGO_SETTINGS_MODULE", "PROMETHEUS_MULTIPROC_DIR"):
        env.pop(inherited, None)  # make run's own defaults: SQLite in its var dir, main settings
    env |= {key: str(port) for key, port in PORTS.items()} | {
        "NOVACRON_VAR_DIR": str(var_dir),
        "NOVACRON_ADMIN_PASSWORD": ENV_PASSWORD,
        "HOST": "127.0.0.1",
        "REDIS_URL": os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15"),
    }
    console = var_dir / "console.txt"
    with console.open("wb") as output:
        script = subprocess.Popen(
            ["scripts/run-local.sh"], cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    started: set[int] = set()
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while token_status(ENV_PASSWORD) != 200:
            assert script.poll() is None, f"run-local.sh exited:\n{console.read_text()[-3000:]}"
            assert time.monotonic() < deadline, (
                f"no API after {START_TIMEOUT} s:\n{console.read_text()[-3000:]}"
            )
            time.sleep(1)
        assert token_status(FILE_PASSWORD) == 400

        started = descendants(script.pid)
        assert len(started) >= 6, "web, control, beat, flower and two nodes"
        os.killpg(script.pid, signal.SIGINT)  # what Ctrl-C does
        script.wait(timeout=STOP_TIMEOUT)
        deadline = time.monotonic() + 10
        while any(process_running(pid) for pid in started) and time.monotonic() < deadline:
            time.sleep(0.2)
        survivors = {
            pid: (Path("/proc") / str(pid) / "cmdline").read_bytes()
            for pid in started
            if process_running(pid)
        }
        assert not survivors, f"still running after make run stopped: {survivors}"
        text = console.read_text()
        assert ENV_PASSWORD not in text and "password from NOVACRON_ADMIN_PASSWORD" in text
        assert " INFO " not in text, "INFO records belong in var/log/<process>.log"
        assert " INFO " in (var_dir / "log" / "beat.log").read_text()
    finally:
        for pid in started | descendants(script.pid) | {script.pid}:
            if process_running(pid):
                os.kill(pid, signal.SIGKILL)
        script.wait(timeout=STOP_TIMEOUT)
