"""Boot the real test guest under TCG: ticks, the checksum request protocol, dirtying, the disk marker."""

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from workers.guest.boot import GuestError, GuestImage, GuestVM, SerialConsole

pytestmark = pytest.mark.qemu


def read_for(console: SerialConsole, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while (remaining := deadline - time.monotonic()) > 0:
        console.read_line(remaining)


@pytest.fixture(scope="module")
def dirtying_guest(guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GuestVM]:
    run_dir = tmp_path_factory.mktemp("dirtying-guest")
    with GuestVM(guest_image, run_dir, extra_cmdline="dirty_mb=16 dirty_rate_mb=8") as vm:
        vm.start()
        vm.wait_first_tick(60)
        yield vm


def test_boots_and_ticks_every_100_ms(dirtying_guest: GuestVM):
    console = dirtying_guest.console
    assert console is not None
    assert console.ticks[0][0] - dirtying_guest.started_at < 30
    read_for(console, 1.5)
    numbers = [number for _, number in console.ticks]
    assert numbers[0] == 0
    assert numbers == list(range(len(numbers)))
    assert len(numbers) >= 8
    (first_at, first), (last_at, last) = console.ticks[0], console.ticks[-1]
    assert 0.05 < (last_at - first_at) / (last - first) < 0.3
    assert "" in console.lines  # the guest prints an empty line before its first tick


def test_checksum_changes_while_dirtying_and_holds_while_paused(dirtying_guest: GuestVM):
    console = dirtying_guest.console
    assert console is not None
    if not any(line.startswith("dirty ready") for line in console.lines):
        console.wait_for(r"dirty ready 16 8$", 30)
    assert console.request("ping") == []
    first = console.checksum()
    assert len(first) == 32 and int(first, 16) >= 0
    time.sleep(0.5)
    second = console.checksum()
    assert second != first

    assert console.request("pause") == []
    paused = console.checksum()
    time.sleep(0.5)
    assert console.checksum() == paused

    assert console.request("resume") == []
    time.sleep(0.5)
    assert console.checksum() != paused
    ticks_before = len(console.ticks)
    read_for(console, 0.5)
    assert len(console.ticks) > ticks_before


def test_errors_are_answered(dirtying_guest: GuestVM):
    console = dirtying_guest.console
    assert console is not None
    console.send("frobnicate t1")
    console.wait_for(r"error t1 unknown-command frobnicate$", 10)
    with pytest.raises(GuestError, match="no-disk"):
        console.request("disk-read")


def test_idle_memory_checksum_is_stable_and_disk_marker_persists(guest_image: GuestImage, tmp_path: Path):
    disk = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "8M"], check=True)
    with GuestVM(guest_image, tmp_path / "run", extra_cmdline="dirty_mb=4 dirty_rate_mb=0", disk=disk) as vm:
        console = vm.start()
        vm.wait_first_tick(60)
        console.wait_for(r"dirty ready 4 0$", 30)
        first = console.checksum()
        time.sleep(0.3)
        assert console.checksum() == first
        assert console.request("disk-read") == ["-"]
        assert console.request("disk-write", "marker-42") == ["marker-42"]
        assert console.request("disk-read") == ["marker-42"]
    raw = tmp_path / "disk.raw"
    subprocess.run(
        ["qemu-img", "dd", "-f", "qcow2", "-O", "raw", f"if={disk}", f"of={raw}", "bs=512", "count=1"],
        check=True,
    )
    assert raw.read_bytes().startswith(b"novacron-testguest marker-42\n")


def test_guest_without_dirty_memory_answers_none(guest_image: GuestImage, tmp_path: Path):
    with GuestVM(guest_image, tmp_path) as vm:
        console = vm.start()
        vm.wait_first_tick(60)
        assert console.checksum() == "none"
        with pytest.raises(GuestError, match="no-dirty-memory"):
            console.request("pause")
