"""The test guest across a real live migration (TCG, unix socket): it keeps ticking and keeps its memory,
as its checksum request shows."""

import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from workers.guest.boot import GuestImage, GuestVM

pytestmark = pytest.mark.qemu

CMDLINE = "dirty_mb=16 dirty_rate_mb=8"


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # QMP and migration sockets need short paths (unix socket paths are limited to 107 bytes).
    with tempfile.TemporaryDirectory(prefix="tgmig-", dir="/tmp") as directory:
        yield Path(directory)


def qmp(path: Path) -> QEMUMonitorProtocol:
    deadline = time.monotonic() + 10
    while not path.exists():
        assert time.monotonic() < deadline, f"QMP socket {path} did not appear"
        time.sleep(0.05)
    monitor = QEMUMonitorProtocol(str(path))
    monitor.connect()
    return monitor


def run(monitor: QEMUMonitorProtocol, command: str, **arguments: object) -> dict[str, Any]:
    result = monitor.cmd(command, **arguments)
    assert isinstance(result, dict)
    return result


def test_memory_checksum_and_ticks_survive_live_migration(guest_image: GuestImage, short_dir: Path):
    incoming = short_dir / "migration.sock"
    source = GuestVM(
        guest_image,
        short_dir / "src",
        extra_cmdline=CMDLINE,
        extra_args=["-qmp", f"unix:{short_dir / 'src.qmp'},server=on,wait=off"],
    )
    destination = GuestVM(
        guest_image,
        short_dir / "dst",
        extra_cmdline=CMDLINE,
        extra_args=[
            "-qmp",
            f"unix:{short_dir / 'dst.qmp'},server=on,wait=off",
            "-incoming",
            f"unix:{incoming}",
        ],
    )
    with source, destination:
        src_channel = source.start()
        source.wait_first_tick(60)
        src_channel.wait_for(r"dirty ready 16 8$", 30)
        dst_channel = destination.start()
        src_qmp, dst_qmp = qmp(short_dir / "src.qmp"), qmp(short_dir / "dst.qmp")
        try:
            assert src_channel.request("pause") == []
            before = src_channel.checksum()
            run(src_qmp, "migrate-set-parameters", **{"max-bandwidth": 1 << 30})
            run(src_qmp, "migrate", uri=f"unix:{incoming}")
            deadline = time.monotonic() + 60
            while (status := run(src_qmp, "query-migrate").get("status")) not in ("completed", "failed"):
                assert time.monotonic() < deadline, f"migration still {status}"
                time.sleep(0.1)
            assert status == "completed"
            assert run(dst_qmp, "query-status")["status"] == "running"

            first = int(dst_channel.wait_for(r"tick (\d+)$", 10).group(1))
            assert first > 0  # the counter carried on from the source rather than restarting
            assert dst_channel.checksum() == before
            assert dst_channel.request("resume") == []
            time.sleep(0.5)
            assert dst_channel.checksum() != before
        finally:
            src_qmp.close()
            dst_qmp.close()
