"""Boot the test guest under QEMU and talk to its two serial ports.

Used by the builder's boot check and by tests: :class:`GuestVM` starts ``qemu-system-x86_64`` with the
guest's kernel and initramfs, its serial console (``ttyS0``, a user's shell) and its guest channel
(``ttyS1``, the request protocol of :mod:`workers.guest`) each on a unix socket chardev whose output is
also logged to a file. :class:`LineSocket` reads and writes lines on either socket; :class:`GuestChannel`
adds the protocol: it records ``tick N`` lines and sends the one-line requests.
"""

from __future__ import annotations

import itertools
import json
import re
import select
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

QEMU = "qemu-system-x86_64"
SOCKET_PATH_MAX = 100
TICK = re.compile(r"^tick (\d+)$")
# Request word -> word that starts its answer (an "error" line may answer any request).
ANSWERS = {
    "ping": "pong",
    "checksum": "checksum",
    "pause": "paused",
    "resume": "resumed",
    "disk-write": "disk-written",
    "disk-read": "disk",
    "net": "net",
    "reach": "reach",
    "tcp": "tcp",
    "spoof-ip": "spoof-ip",
    "spoof-mac": "spoof-mac",
    "dhcp-serve": "dhcp-serve",
}


class GuestError(RuntimeError):
    """The guest or its QEMU process did not behave as the protocol says."""


@dataclass(frozen=True)
class GuestImage:
    """Kernel, initramfs and recommended command line of a built test guest."""

    kernel: Path
    initrd: Path
    cmdline: str

    @classmethod
    def from_manifest(cls, manifest_path: Path) -> GuestImage:
        """Read ``manifest.json`` as written by :mod:`workers.guest.build` (paths are relative to it)."""
        manifest = json.loads(manifest_path.read_text())
        base = manifest_path.parent
        return cls(
            kernel=base / manifest["kernel"]["path"],
            initrd=base / manifest["initrd"]["path"],
            cmdline=manifest["cmdline"],
        )


def qemu_command(
    image: GuestImage,
    *,
    console_socket: Path,
    console_log: Path,
    guest_socket: Path,
    guest_log: Path,
    memory_mb: int = 256,
    accel: str = "tcg",
    extra_cmdline: str = "",
    disk: Path | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The QEMU command line that boots ``image`` with its console on ``console_socket`` and its guest
    channel on ``guest_socket``.

    Each socket is a server that does not wait for a client; everything the guest prints on the port is
    also appended to its log. ``disk`` (a qcow2 file) is attached as a virtio-blk device, ``/dev/vda`` in
    the guest. ``extra_args`` are appended as they are (e.g. ``-qmp`` or ``-incoming`` options).
    """
    cmdline = f"{image.cmdline} {extra_cmdline}".strip()
    command = [
        QEMU,
        "-machine",
        f"q35,accel={accel}",
        "-m",
        str(memory_mb),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-kernel",
        str(image.kernel),
        "-initrd",
        str(image.initrd),
        "-append",
        cmdline,
        *serial_arguments("console", console_socket, console_log),
        *serial_arguments("guest", guest_socket, guest_log),
    ]
    if disk is not None:
        command += [
            "-blockdev",
            f"driver=file,filename={disk},node-name=file0",
            "-blockdev",
            "driver=qcow2,file=file0,node-name=disk0",
            "-device",
            "virtio-blk-pci,drive=disk0",
        ]
    return [*command, *extra_args]


def serial_arguments(chardev_id: str, sock: Path, log: Path) -> list[str]:
    """The next serial port of the guest (``ttyS0``, then ``ttyS1``) on a unix socket that also logs to
    ``log``."""
    return [
        "-chardev",
        f"socket,id={chardev_id},path={sock},server=on,wait=off,logfile={log}",
        "-serial",
        f"chardev:{chardev_id}",
    ]


@dataclass
class LineSocket:
    """Line-oriented client of a serial port's unix socket (the console or the guest channel).

    Every complete line read is kept in ``lines``.
    """

    sock: socket.socket
    lines: list[str] = field(default_factory=list)
    _buffer: bytes = b""

    @classmethod
    def connect(cls, path: Path, timeout: float, alive: subprocess.Popen[bytes] | None = None) -> Self:
        """Connect to the chardev socket, retrying until QEMU has created it (or ``alive`` has exited)."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(path))
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if alive is not None and alive.poll() is not None:
                    raise GuestError(
                        f"QEMU exited with status {alive.returncode} before {path} opened"
                    ) from None
                if time.monotonic() > deadline:
                    raise GuestError(f"serial port socket {path} did not open in {timeout} s") from None
                time.sleep(0.02)
                continue
            sock.setblocking(False)
            return cls(sock)

    def close(self) -> None:
        """Close the socket (the guest keeps running)."""
        self.sock.close()

    def read_line(self, timeout: float) -> str | None:
        """The next line (without ``\\r\\n``), or None if none completes within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            readable, _, _ = select.select([self.sock], [], [], remaining)
            if not readable:
                continue
            chunk = self.sock.recv(65536)
            if not chunk:
                raise GuestError("serial port closed (QEMU exited?)")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\n", 1)
        line = raw.decode(errors="replace").strip("\r")
        self.lines.append(line)
        self._received(line)
        return line

    def _received(self, line: str) -> None:
        """Called with every complete line read (for subclasses that track some)."""

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        """Read lines until one matches the regular expression ``pattern`` (anchored at the start)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            line = self.read_line(remaining)
            if line is not None and (match := regex.match(line)):
                return match
        raise GuestError(f"no line matching {pattern!r} within {timeout} s; last lines: {self.lines[-5:]}")

    def send(self, line: str) -> None:
        """Write one line to the guest's side of the port."""
        self.sock.setblocking(True)
        try:
            self.sock.sendall(line.encode() + b"\n")
        finally:
            self.sock.setblocking(False)


@dataclass
class GuestChannel(LineSocket):
    """Client of the test guest's request protocol on its guest channel (``ttyS1``).

    ``tick N`` lines are also kept in ``ticks`` as ``(monotonic time received, N)``.
    """

    ticks: list[tuple[float, int]] = field(default_factory=list)
    _tags: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def _received(self, line: str) -> None:
        tick = TICK.match(line)
        if tick:
            self.ticks.append((time.monotonic(), int(tick.group(1))))

    def request(self, command: str, *args: str, timeout: float = 30.0) -> list[str]:
        """Send ``command TAG args...`` and return the words of the answer after its tag.

        Raises :class:`GuestError` on an ``error TAG ...`` answer or when none arrives in ``timeout``.
        """
        if command not in ANSWERS:
            raise ValueError(f"unknown request {command!r}")
        tag = f"r{next(self._tags)}"
        self.send(" ".join([command, tag, *args]))
        match = self.wait_for(rf"(?:{re.escape(ANSWERS[command])}|error) {tag}(?: |$)", timeout)
        words = match.string.split()
        if words[0] == "error":
            raise GuestError(f"guest answered {command!r} with: {match.string}")
        return words[2:]

    def checksum(self, timeout: float = 60.0) -> str:
        """Checksum (MD5 hex) of the guest's dirty memory, or ``none`` when it has none."""
        return self.request("checksum", timeout=timeout)[0]


class GuestVM:
    """A running test guest: QEMU process plus its guest channel, as a context manager that always kills
    QEMU. ``console_socket`` / ``console_log`` are its serial console (connect with :class:`LineSocket`),
    ``guest_socket`` / ``guest_log`` its guest channel (``channel`` once started)."""

    def __init__(
        self,
        image: GuestImage,
        run_dir: Path,
        *,
        memory_mb: int = 256,
        accel: str = "tcg",
        extra_cmdline: str = "",
        disk: Path | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        socket_dir = run_dir
        self._socket_dir: Path | None = None
        if len(str(run_dir / "console.sock")) > SOCKET_PATH_MAX:
            # Unix socket paths are limited to 107 bytes; deep run dirs (pytest's tmp_path) exceed it.
            self._socket_dir = socket_dir = Path(tempfile.mkdtemp(prefix="testguest-", dir="/tmp"))
        self.console_socket = socket_dir / "console.sock"
        self.guest_socket = socket_dir / "guest.sock"
        self.console_log = run_dir / "console.log"
        self.guest_log = run_dir / "guest.log"
        self.command = qemu_command(
            image,
            console_socket=self.console_socket,
            console_log=self.console_log,
            guest_socket=self.guest_socket,
            guest_log=self.guest_log,
            memory_mb=memory_mb,
            accel=accel,
            extra_cmdline=extra_cmdline,
            disk=disk,
            extra_args=extra_args,
        )
        self.stderr_path = run_dir / "qemu.stderr"
        self.process: subprocess.Popen[bytes] | None = None
        self.channel: GuestChannel | None = None
        self.started_at = 0.0

    def start(self, connect_timeout: float = 10.0) -> GuestChannel:
        """Start QEMU and connect to the guest channel; ``started_at`` is the monotonic start time."""
        for sock in (self.console_socket, self.guest_socket):
            sock.unlink(missing_ok=True)
        with self.stderr_path.open("wb") as stderr:
            self.started_at = time.monotonic()
            self.process = subprocess.Popen(
                self.command, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr
            )
        self.channel = GuestChannel.connect(self.guest_socket, connect_timeout, alive=self.process)
        return self.channel

    def wait_first_tick(self, timeout: float = 60.0) -> float:
        """Seconds from QEMU start to the guest's first ``tick`` line."""
        if self.channel is None:
            raise GuestError("guest not started")
        try:
            self.channel.wait_for(r"tick \d+$", timeout)
        except GuestError as error:
            raise GuestError(f"{error}; QEMU stderr: {self.stderr()!r}") from None
        return self.channel.ticks[0][0] - self.started_at

    def stderr(self) -> str:
        """What QEMU wrote to stdout/stderr so far."""
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def stop(self) -> None:
        """Kill QEMU (the guest has no ACPI handling, so there is nothing gentler) and close the channel."""
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        for sock in (self.console_socket, self.guest_socket):
            sock.unlink(missing_ok=True)
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)

    def __enter__(self) -> GuestVM:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
