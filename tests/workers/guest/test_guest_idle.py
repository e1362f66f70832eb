"""Boot a real test guest under TCG whose memory is filled but not rewritten, with a disk: stable
checksums without pausing, and the disk marker written through the request protocol."""

import subprocess
import time
from pathlib import Path

import pytest

from workers.guest.boot import GuestImage, GuestVM

pytestmark = pytest.mark.qemu


def test_idle_memory_checksum_is_stable_and_disk_marker_persists(guest_image: GuestImage, tmp_path: Path):
    disk = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "8M"], check=True)
    with GuestVM(guest_image, tmp_path / "run", extra_cmdline="dirty_mb=4 dirty_rate_mb=0", disk=disk) as vm:
        channel = vm.start()
        vm.wait_first_tick(60)
        channel.wait_for(r"dirty ready 4 0$", 30)
        first = channel.checksum()
        time.sleep(0.3)
        assert channel.checksum() == first
        assert channel.request("disk-read") == ["-"]
        assert channel.request("disk-write", "marker-42") == ["marker-42"]
        assert channel.request("disk-read") == ["marker-42"]
    raw = tmp_path / "disk.raw"
    subprocess.run(
        ["qemu-img", "dd", "-f", "qcow2", "-O", "raw", f"if={disk}", f"of={raw}", "bs=512", "count=1"],
        check=True,
    )
    assert raw.read_bytes().startswith(b"novacron-testguest marker-42\n")
