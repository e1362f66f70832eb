"""Boot a real dirtying test guest under TCG: ticks, the checksum request protocol, pause/resume."""

import time
from collections.abc import Iterator

import pytest

from workers.guest.boot import GuestChannel, GuestError, GuestImage, GuestVM

pytestmark = pytest.mark.qemu


def read_for(channel: GuestChannel, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while (remaining := deadline - time.monotonic()) > 0:
        channel.read_line(remaining)


@pytest.fixture(scope="module")
def dirtying_guest(guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GuestVM]:
    run_dir = tmp_path_factory.mktemp("dirtying-guest")
    with GuestVM(guest_image, run_dir, extra_cmdline="dirty_mb=16 dirty_rate_mb=8") as vm:
        vm.start()
        vm.wait_first_tick(60)
        yield vm


def test_checksum_before_the_memory_is_filled_is_refused(dirtying_guest: GuestVM):
    channel = dirtying_guest.channel
    assert channel is not None
    # Filling 16 MiB takes most of a second under TCG; the first tick comes as the fill starts.
    channel.send("checksum early")
    answer = channel.wait_for(r"(checksum|error) early ", 30).string
    if not any(line.startswith("dirty ready") for line in channel.lines[:-1]):
        assert answer == "error early dirty-not-ready"


def test_boots_and_ticks_every_100_ms(dirtying_guest: GuestVM):
    channel = dirtying_guest.channel
    assert channel is not None
    assert channel.ticks[0][0] - dirtying_guest.started_at < 30
    read_for(channel, 1.5)
    numbers = [number for _, number in channel.ticks]
    assert numbers[0] == 0
    assert numbers == list(range(len(numbers)))
    assert len(numbers) >= 8
    (first_at, first), (last_at, last) = channel.ticks[0], channel.ticks[-1]
    assert 0.05 < (last_at - first_at) / (last - first) < 0.3
    assert "" in channel.lines  # the guest prints an empty line before its first tick


def test_checksum_changes_while_dirtying_and_holds_while_paused(dirtying_guest: GuestVM):
    channel = dirtying_guest.channel
    assert channel is not None
    if not any(line.startswith("dirty ready") for line in channel.lines):
        channel.wait_for(r"dirty ready 16 8$", 30)
    assert channel.request("ping") == []
    first = channel.checksum()
    assert len(first) == 32 and int(first, 16) >= 0
    time.sleep(0.5)
    second = channel.checksum()
    assert second != first

    assert channel.request("pause") == []
    paused = channel.checksum()
    time.sleep(0.5)
    assert channel.checksum() == paused

    assert channel.request("resume") == []
    time.sleep(0.5)
    assert channel.checksum() != paused
    ticks_before = len(channel.ticks)
    read_for(channel, 0.5)
    assert len(channel.ticks) > ticks_before


def test_errors_are_answered(dirtying_guest: GuestVM):
    channel = dirtying_guest.channel
    assert channel is not None
    channel.send("frobnicate t1")
    channel.wait_for(r"error t1 unknown-command frobnicate$", 10)
    with pytest.raises(GuestError, match="no-disk"):
        channel.request("disk-read")
