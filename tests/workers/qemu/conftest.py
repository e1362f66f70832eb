"""Fixtures for the QEMU driver tests: the test guest, short data dirs, drivers, and cleanup of QEMU.

Guests run under TCG. Every data dir is swept on teardown: any QEMU still running from it is killed,
so a failing test never leaves a process behind.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from workers.qemu import AcceleratorSetting, DriverSettings, KernelImage, QemuDriver, VmSpec
from workers.qemu.layout import NodeLayout
from workers.qemu.process import kill_hard, read_pid

REPO_ROOT = Path(__file__).resolve().parents[3]
GUEST_DIR = REPO_ROOT / "var" / "images" / "testguest"
GUEST_BUILD_TIMEOUT = 900


@pytest.fixture(scope="session")
def testguest() -> KernelImage:
    """The tiny Linux test guest (kernel + initramfs printing ``tick N`` on its guest channel). The
    builder runs every session: it rebuilds a guest built from other sources (e.g. an older init.sh)
    and only checks an up-to-date one."""
    subprocess.run(
        [sys.executable, "-m", "workers.guest.build", "--out", str(GUEST_DIR)],
        cwd=REPO_ROOT,
        check=True,
        timeout=GUEST_BUILD_TIMEOUT,
        stdout=subprocess.DEVNULL,
    )
    manifest = json.loads((GUEST_DIR / "manifest.json").read_text())
    return KernelImage(
        kernel_path=GUEST_DIR / manifest["kernel"]["path"],
        initrd_path=GUEST_DIR / manifest["initrd"]["path"],
        cmdline=manifest["cmdline"],
    )


def sweep(data_dir: Path) -> None:
    """Kill every QEMU started from ``data_dir`` and remove the directory."""
    layout = NodeLayout(data_dir)
    for vm_uuid in layout.vm_uuids():
        paths = layout.vm(vm_uuid)
        pid = read_pid(paths.pidfile)
        if pid is not None:
            kill_hard(pid, str(paths.qmp_socket), timeout=5)
    shutil.rmtree(data_dir, ignore_errors=True)


def new_data_dir() -> Path:
    # Short paths under /tmp: pytest's tmp_path can push QMP socket paths past the 107-byte limit.
    return Path(tempfile.mkdtemp(prefix="ncq-", dir="/tmp"))


def tcg_settings(data_dir: Path) -> DriverSettings:
    return DriverSettings(
        data_dir=data_dir, accelerator=AcceleratorSetting.TCG, powerdown_timeout=1.0, qmp_timeout=5.0
    )


@pytest.fixture
def data_dir() -> Iterator[Path]:
    directory = new_data_dir()
    yield directory
    sweep(directory)


@pytest.fixture
def driver(data_dir: Path) -> Iterator[QemuDriver]:
    with QemuDriver(tcg_settings(data_dir)) as qemu_driver:
        yield qemu_driver


@pytest.fixture
def guest_spec(testguest: KernelImage) -> Callable[..., VmSpec]:
    """Factory for test-guest specs; keyword arguments override the defaults."""

    def make(**overrides: object) -> VmSpec:
        fields: dict[str, object] = {
            "uuid": str(uuid.uuid4()),
            "name": "testguest",
            "vcpus": 1,
            "memory_mb": 256,
            "disk_gb": 1,
            "image": testguest,
        }
        fields.update(overrides)
        return VmSpec(**fields)  # type: ignore[arg-type]

    return make


def wait_for_serial(log: Path, needle: bytes, *, timeout: float = 30.0, offset: int = 0) -> float:
    """Wait until ``needle`` appears in a serial port's log (``serial.log`` for the console, ``guest.log``
    for the test guest's ticks and answers) after byte ``offset``; seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if log.exists() and needle in log.read_bytes()[offset:]:
            return time.monotonic() - started
        time.sleep(0.05)
    tail = log.read_bytes()[-300:] if log.exists() else b"(no serial log)"
    raise AssertionError(f"{needle!r} not on the serial console within {timeout} s; last output: {tail!r}")


def last_tick(log: Path) -> int:
    """The highest tick number printed so far."""
    ticks = [
        int(line.split()[1])
        for line in log.read_text(errors="replace").splitlines()
        if line.startswith("tick ")
    ]
    return max(ticks) if ticks else -1


def live_migrate(source: QemuDriver, source_uuid: str, dest: QemuDriver, dest_uuid: str) -> dict[str, Any]:
    """Migrate a running VM of ``source`` into the paused incoming VM of ``dest`` through a unix socket
    (bandwidth cap lifted); QEMU's ``query-migrate`` answer once it completed."""
    channel = dest.layout.data_dir / "migration.sock"
    dest.execute(dest_uuid, "migrate-incoming", {"uri": f"unix:{channel}"})
    with source.job_session(source_uuid) as qmp:
        qmp.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
        qmp.execute("migrate-set-parameters", {"max-bandwidth": 1 << 30})
        mark = qmp.event_mark()
        started = time.monotonic()
        qmp.execute("migrate", {"uri": f"unix:{channel}"})
        done = qmp.wait_event(
            "MIGRATION",
            after=mark,
            timeout=60,
            match=lambda event: event.data.get("status") in ("completed", "failed"),
        )
        print(f"\nmigration {done.data['status']} in {time.monotonic() - started:.2f} s")
        assert done.data["status"] == "completed"
    return source.execute(source_uuid, "query-migrate")


def qemu_processes_for(socket_path: Path) -> list[int]:
    """Pids of live processes whose command line names ``socket_path``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (
                str(socket_path).encode() in (proc / "cmdline").read_bytes()
                and " Z " not in (proc / "stat").read_text()
            ):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids
