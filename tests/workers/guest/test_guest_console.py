"""Boot the test guest under TCG: its serial console is a user's shell, its guest channel carries the
request protocol, and neither shows the other's traffic."""

import secrets
import time
from pathlib import Path

import pytest

from workers.guest.boot import GuestImage, GuestVM, LineSocket

pytestmark = pytest.mark.qemu

BOOT_TIMEOUT = 60.0
SHELL_TIMEOUT = 30.0


def shell_pid(console: LineSocket, word: str) -> int:
    """Type ``echo WORD $$`` on the console and return the PID of the shell that answered."""
    console.send(f"echo {word} $$")
    return int(console.wait_for(rf"{word} (\d+)$", SHELL_TIMEOUT).group(1))


def test_the_console_is_a_respawned_shell_and_the_protocol_stays_on_the_guest_channel(
    guest_image: GuestImage, tmp_path: Path
):
    word = f"hello-{secrets.token_hex(4)}"
    with GuestVM(guest_image, tmp_path / "run") as vm:
        channel = vm.start()
        console = LineSocket.connect(vm.console_socket, 10)
        try:
            vm.wait_first_tick(BOOT_TIMEOUT)
            # Boot output on the console, then a shell that answers what is typed.
            console.wait_for(r"NovaCron test guest: this console is a shell", BOOT_TIMEOUT)
            first_shell = shell_pid(console, word)

            # The protocol on the channel, while the shell runs.
            assert channel.request("ping") == []
            ticks_before = len(channel.ticks)
            assert channel.request("ping") == []
            time.sleep(1)
            channel.request("ping")
            assert len(channel.ticks) >= ticks_before + 5

            # ^C reaches the foreground job: the console is the shell's controlling terminal.
            console.send("sleep 60")
            time.sleep(1)
            console.sock.sendall(b"\x03")
            assert shell_pid(console, f"{word}-interrupted") == first_shell

            # The shell comes back after exit, as a new process (what is typed before it starts is lost
            # with the old session, as on any terminal).
            console.send("exit")
            console.wait_for(r"BusyBox v", SHELL_TIMEOUT)
            second_shell = shell_pid(console, f"{word}-again")
            assert second_shell != first_shell
            assert any(line.startswith("testguest# ") for line in console.lines)  # its prompt
        finally:
            console.close()

    console_log = vm.console_log.read_text(errors="replace")
    guest_log = vm.guest_log.read_text(errors="replace")
    assert f"{word}-again" in console_log
    assert "tick " not in console_log and "pong " not in console_log
    assert {"tick 0", "pong r1"} <= set(guest_log.splitlines())
    assert word not in guest_log and "testguest#" not in guest_log
