"""The RAM case of bench-dwcp: the QEMU migration stream of a loaded guest (issue 4, section 5).

The guest is the repository's test guest under TCG with ``MEMORY_MB`` of RAM, ``DIRTY_MB`` of it
filled with program text and data (``dirty_data=binaries``: a real guest's RAM, compressible), the rest never touched (zero pages). Two things come out of it:

* ``capture_stream``: the migration stream itself as a file (``migrate exec:cat > FILE`` with
  QEMU's bandwidth cap lifted), which the file tools (nc, rsync, DWCP send) then move like any
  other data set;
* ``live_migrations``: the same guest migrated live from the sending side to the receiving side
  of the link, by QEMU alone over TCP (one stream; and multifd x4 with zstd, QEMU's own
  compression) and by QEMU through a DWCP tunnel (``python -m workers.dwcp tunnel`` to
  ``serve --tunnel-root``, unix sockets at both QEMUs). Each run boots a paused destination,
  migrates, and resumes the source (``cont``) for the next run, so every run moves the same RAM.

Times run from the source's ``migrate`` to the destination's ``completed``; data bytes are the
stream's (QEMU's ``ram.transferred``, counted before multifd's compression); wire bytes are the
tunnel's payload for DWCP and, for QEMU alone, what the sender's veth interface sent (TCP/IP headers
included), or on loopback QEMU's own count. CPU seconds are both QEMU processes' during the migration
plus, for DWCP, both DWCP processes. RSS is the DWCP processes' peak (the QEMUs hold the guest, so none is given for them).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers.guest.boot import GuestImage, qemu_command
from workers.qemu import QmpSession
from workers.qemu.qmp import EventLoopThread

MEMORY_MB = 1024
DIRTY_MB = 256
MIGRATION_PORT = 17404
DWCP_PORT = 17405
NO_CAP = 1 << 40  # QEMU's default max-bandwidth is 32 MiB/s: every run lifts it, as NovaCron does


def guest_image(repo: Path) -> GuestImage:
    manifest = repo / "var" / "images" / "testguest" / "manifest.json"
    if not manifest.exists():
        subprocess.run(
            [
                str(repo / ".venv" / "bin" / "python"),
                "-m",
                "workers.guest.build",
                "--out",
                str(manifest.parent),
            ],
            cwd=repo,
            check=True,
        )
    return GuestImage.from_manifest(manifest)


def _wait(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Guest:
    """One daemonized QEMU of the test guest with its QMP session (``incoming``: a paused destination)."""

    def __init__(
        self, image: GuestImage, run_dir: Path, loop: EventLoopThread, *, wrap: list[str], incoming: bool
    ) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir = run_dir
        self.guest_log = run_dir / "guest.log"
        extra = ["-cpu", "max", "-daemonize", "-pidfile", str(run_dir / "qemu.pid"),
                 "-qmp", f"unix:{run_dir / 'qmp.sock'},server=on,wait=off"]  # fmt: skip
        if incoming:
            extra += ["-S", "-incoming", "defer"]
        command = qemu_command(
            image,
            console_socket=run_dir / "console.sock",
            console_log=run_dir / "serial.log",
            guest_socket=run_dir / "guest.sock",
            guest_log=self.guest_log,
            memory_mb=MEMORY_MB,
            extra_cmdline="" if incoming else f"dirty_mb={DIRTY_MB} dirty_data=binaries",
            extra_args=extra,
        )
        subprocess.run([*wrap, *command], check=True)
        self.pid = int((run_dir / "qemu.pid").read_text())
        self.qmp = QmpSession(run_dir / "qmp.sock", loop, timeout=30)
        self.qmp.execute(
            "migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]}
        )

    def wait_loaded(self) -> None:
        _wait(
            lambda: "dirty ready" in self.guest_log.read_text(errors="replace"), 600, "the guest's RAM load"
        )

    def migration_status(self) -> str:
        return str(self.qmp.execute("query-migrate").get("status", ""))

    def close(self) -> None:
        with contextlib.suppress(Exception):  # the process may be gone already
            self.qmp.execute("quit")
        self.qmp.close()
        with contextlib.suppress(ProcessLookupError):
            _wait(lambda: not Path(f"/proc/{self.pid}").exists(), 10, "QEMU to quit")


def capture_stream(image: GuestImage, scratch: Path, loop: EventLoopThread) -> Path:
    """The migration stream of the loaded guest, as a file (made once, kept for every link)."""
    stream = scratch / f"qemu-ram-{MEMORY_MB}M.stream"
    if stream.exists():
        return stream
    guest = Guest(image, scratch / "capture", loop, wrap=[], incoming=False)
    try:
        guest.wait_loaded()
        guest.qmp.execute("migrate-set-parameters", {"max-bandwidth": NO_CAP})
        guest.qmp.execute("migrate", {"uri": f"exec:cat > {stream}.part"})
        _wait(lambda: guest.migration_status() in ("completed", "failed"), 600, "the stream capture")
        if guest.migration_status() != "completed":
            raise RuntimeError("capturing the migration stream failed")
    finally:
        guest.close()
    os.replace(f"{stream}.part", stream)
    return stream


def _stop_timed(process: subprocess.Popen[str]) -> str:
    """Stop the command /usr/bin/time runs (it forwards no signals) and return time's report."""
    if process.poll() is None:
        for child in Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split():
            os.kill(int(child), signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    return stderr


@contextlib.contextmanager
def _destination(image: GuestImage, run_dir: Path, loop: EventLoopThread, wrap: list[str]) -> Iterator[Guest]:
    guest = Guest(image, run_dir, loop, wrap=wrap, incoming=True)
    try:
        yield guest
    finally:
        guest.close()


@dataclass(frozen=True)
class LinkSetup:
    """How the bench reaches the two sides of a link and runs DWCP there."""

    wrap: Callable[[str, list[str]], list[str]]  # ("send" | "recv", command) -> command in that namespace
    receiver_ip: str
    python: str
    env: dict[str, str]
    parse_time: Callable[[str], tuple[float, float, int]]  # /usr/bin/time's report -> wall, CPU, RSS
    streams: int
    sent_on_link: Callable[[], int] | None  # bytes the sender's interface sent so far; None on loopback


def live_migrations(
    image: GuestImage, scratch: Path, loop: EventLoopThread, setup: LinkSetup
) -> list[dict[str, Any]]:
    """QEMU alone (TCP, multifd+zstd) and QEMU through DWCP, each migrating the same loaded guest."""
    wrap, streams = setup.wrap, setup.streams
    source = Guest(image, scratch / "src", loop, wrap=wrap("send", []), incoming=False)
    runs: list[dict[str, Any]] = []
    try:
        source.wait_loaded()
        for variant in ("qemu tcp", "qemu multifd4 zstd", f"qemu via dwcp x{streams}"):
            with _destination(image, scratch / "dst", loop, wrap("recv", [])) as destination:
                runs.append(_migrate_once(variant, source, destination, setup))
            source.qmp.execute("cont")  # postmigrate -> running: the next run moves the same RAM
    finally:
        source.close()
    return runs


def _migrate_once(variant: str, source: Guest, destination: Guest, setup: LinkSetup) -> dict[str, Any]:
    wrap, receiver_ip, python, env = setup.wrap, setup.receiver_ip, setup.python, setup.env
    multifd = "multifd" in variant
    through_dwcp = "dwcp" in variant
    capabilities = [{"capability": "events", "state": True}, {"capability": "multifd", "state": multifd}]
    parameters: dict[str, Any] = {"max-bandwidth": NO_CAP}
    if multifd:
        parameters |= {"multifd-channels": 4, "multifd-compression": "zstd", "multifd-zstd-level": 1}
    for guest in (source, destination):
        guest.qmp.execute("migrate-set-capabilities", {"capabilities": capabilities})
        guest.qmp.execute(
            "migrate-set-parameters", {k: v for k, v in parameters.items() if k != "max-bandwidth"}
        )
    source.qmp.execute("migrate-set-parameters", {"max-bandwidth": NO_CAP})
    processes: list[subprocess.Popen[str]] = []
    try:
        if through_dwcp:
            destination.qmp.execute("migrate-incoming", {"uri": f"unix:{destination.run_dir / 'mig.sock'}"})
            local = source.run_dir / "tunnel.sock"
            timed = ["/usr/bin/time", "-f", "TIME %e %U %S %M"]
            server = subprocess.Popen(
                wrap("recv", [*timed, python, "-m", "workers.dwcp", "serve", "--listen", f"{receiver_ip}:{DWCP_PORT}",
                              "--root", str(destination.run_dir), "--node-name", "bench"]),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
            )  # fmt: skip
            processes.append(server)
            assert server.stdout is not None
            server.stdout.readline()  # the listening banner
            tunnel = subprocess.Popen(
                wrap("send", [*timed, python, "-m", "workers.dwcp", "tunnel", "--listen-unix", str(local),
                              "--to", f"{receiver_ip}:{DWCP_PORT}", "--target", "mig.sock",
                              "--streams", str(setup.streams), "--node-name", "bench", "--dest-node", "bench"]),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
            )  # fmt: skip
            processes.append(tunnel)
            assert tunnel.stdout is not None
            tunnel.stdout.readline()  # listening
            uri = f"unix:{local}"
        else:
            destination.qmp.execute("migrate-incoming", {"uri": f"tcp:{receiver_ip}:{MIGRATION_PORT}"})
            uri = f"tcp:{receiver_ip}:{MIGRATION_PORT}"
        cpu_before = _cpu_seconds(source.pid) + _cpu_seconds(destination.pid)
        link_before = setup.sent_on_link() if setup.sent_on_link else 0
        started = time.monotonic()
        source.qmp.execute("migrate", {"uri": uri})
        _wait(
            lambda: destination.migration_status() in ("completed", "failed"), 900, f"{variant} to complete"
        )
        wall = time.monotonic() - started
        cpu = _cpu_seconds(source.pid) + _cpu_seconds(destination.pid) - cpu_before
        if destination.migration_status() != "completed":
            raise RuntimeError(f"{variant}: the destination reports a failed migration")
        _wait(lambda: source.migration_status() == "completed", 30, "the source to complete")
        info = source.qmp.execute("query-migrate")
        stream_bytes = int(info["ram"]["transferred"])  # before multifd's compression
        run: dict[str, Any] = {
            "tool": variant,
            "wall": wall,
            "raw_bytes": stream_bytes,
            "wire_bytes": setup.sent_on_link() - link_before if setup.sent_on_link else stream_bytes,
            "cpu": cpu,
            "peak_rss_kib": 0,
            "downtime_ms": info.get("downtime"),
        }
        if through_dwcp:
            tunnel_out, tunnel_err = tunnel.communicate(timeout=60)
            summary = json.loads(tunnel_out.strip().splitlines()[-1])
            _, tunnel_cpu, tunnel_rss = setup.parse_time(tunnel_err)
            _, server_cpu, server_rss = setup.parse_time(_stop_timed(server))
            run |= {
                "wire_bytes": summary["wire_bytes"],
                "cpu": cpu + tunnel_cpu + server_cpu,
                "peak_rss_kib": max(tunnel_rss, server_rss),
                "codec_mix": summary["codec_mix"],
            }
        return run
    finally:
        for process in processes:
            if process.poll() is None:
                _stop_timed(process)
