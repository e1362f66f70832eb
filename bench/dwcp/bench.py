"""DWCP benchmark against nc, rsync and QEMU's own migration on shaped links (issues 4 and 24).

Two network namespaces joined by a veth pair, the sending side's egress shaped with
``tc qdisc tbf`` at 1 Gbit and at 100 Mbit or left unshaped (``unshaped``: several Gbit/s here),
plus loopback in the root namespace. For each link and data set every tool moves the same file
from one side to the other into a fresh directory, ``--runs`` times, the tools taking turns within
each run so that all of them see the same moments of a shared machine:

* ``nc``              the raw link (OpenBSD netcat, its own buffer sizes)
* ``rsync``           rsync daemon (plain TCP, no ssh), whole-file, no compression
* ``rsync -z lz4``    the same with ``-z --compress-choice=lz4``
* ``rsync -z zstd``   the same with ``-z --compress-choice=zstd`` (rsync's default level)
* ``dwcp``            ``python -m workers.dwcp send`` to ``serve``, adaptive codec

Data sets: random bytes, zeros (written, not sparse), a VM disk (an ext4 image about 60 % full of
this machine's libraries, binaries and documentation, its free space sparse), ``mixed``: this
machine's shared libraries and ``/usr/share`` concatenated (``bench/dwcp/mixed.py``; the sha256 of
its file list goes into the JSON), and ``qemu-ram``: the migration stream of a loaded test guest (``bench/dwcp/qemu_ram.py``), moved as a file by the tools
above and, live, by QEMU's native migration over TCP (one stream; multifd x4 with zstd) and by QEMU
through a DWCP tunnel, on the same link.

Columns: wall seconds; effective MB/s (data bytes / wall); goodput (wire bytes / wall: what the
link carried per second); wire MB (payload bytes the tool put on the link: nc = the file, rsync =
its ``--stats`` bytes sent, DWCP = its JSON ``wire_bytes``, QEMU = its ``ram.transferred``);
efficiency (effective rate / nc's on the same link); speed-up against each peer; CPU seconds
(user + system, sender + receiver); peak RSS (the larger of sender and receiver). With several
runs a table shows medians, and the range of wall times and ratios to nc; every run's row is also
written as JSON to ``bench/results/``.

Read the figures with two facts in mind: the DWCP receiver verifies the whole-file digest and
fsyncs before renaming into place (nc and rsync do neither), and "wall" includes starting the
Python interpreter for the sender (under a second on a slow VM); "xfer s" is DWCP's own transfer
time without it. On a one-host benchmark sender and receiver share the same cores.

Run as root (namespaces, tc): ``sudo .venv/bin/python -m bench.dwcp.bench [--quick]``.
All traffic stays on loopback or inside the two namespaces this script creates and deletes.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.dwcp import qemu_ram
from bench.dwcp.mixed import make_mixed
from workers.qemu.qmp import EventLoopThread

REPO = Path(__file__).resolve().parents[2]
PYTHON = str(REPO / ".venv" / "bin" / "python")
MiB = 1024 * 1024
SECRET = "bench-secret-" + os.urandom(8).hex()
TIME_FORMAT = "TIME %e %U %S %M"
NS_SEND = f"dwcpbench-a-{os.getpid()}"
NS_RECV = f"dwcpbench-b-{os.getpid()}"
SEND_IP, RECV_IP = "10.213.0.1", "10.213.0.2"


@dataclass
class Measurement:
    tool: str
    wall: float
    raw_bytes: int
    wire_bytes: int
    cpu: float
    peak_rss_kib: int
    transfer_seconds: float | None = None  # DWCP's own figure, without interpreter start-up
    codec_mix: dict[str, int] | None = None
    downtime_ms: float | None = None  # live migrations: the guest's pause as QEMU reports it

    @property
    def rate(self) -> float:
        return self.raw_bytes / self.wall / 1e6

    @property
    def goodput(self) -> float:
        return self.wire_bytes / self.wall / 1e6


@dataclass(frozen=True)
class Link:
    name: str
    rate: str | None  # tbf rate, None = no shaping
    loopback: bool

    def wrap(self, side: str, command: list[str]) -> list[str]:
        if self.loopback:
            return command
        return ["ip", "netns", "exec", NS_SEND if side == "send" else NS_RECV, *command]

    @property
    def receiver_ip(self) -> str:
        return "127.0.0.1" if self.loopback else RECV_IP

    def sent_on_link(self) -> int:
        """Bytes the sending side's veth has sent so far (headers included)."""
        statistics = run(["ip", "netns", "exec", NS_SEND, "cat", "/sys/class/net/dwb0/statistics/tx_bytes"])
        return int(statistics.stdout)


def run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, check=True, text=True, capture_output=True, **kwargs)  # type: ignore[call-overload]


@contextlib.contextmanager
def namespaces(rate: str | None) -> Iterator[None]:
    """The two namespaces joined by veth; ``rate`` shapes the sender's egress with tbf (None: as fast as veth)."""
    run(["ip", "netns", "add", NS_SEND])
    run(["ip", "netns", "add", NS_RECV])
    try:
        run(
            [
                "ip",
                "link",
                "add",
                "dwb0",
                "netns",
                NS_SEND,
                "type",
                "veth",
                "peer",
                "name",
                "dwb1",
                "netns",
                NS_RECV,
            ]
        )
        for ns, dev, ip in ((NS_SEND, "dwb0", SEND_IP), (NS_RECV, "dwb1", RECV_IP)):
            run(["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev])
            run(["ip", "-n", ns, "link", "set", dev, "up"])
            run(["ip", "-n", ns, "link", "set", "lo", "up"])
        if rate is not None:
            # burst must hold at least one timer tick of traffic at the rate, or tbf undershoots.
            burst = "1mb" if rate == "1gbit" else "256kb"
            tbf = ["tbf", "rate", rate, "burst", burst, "latency", "50ms"]
            run(["ip", "netns", "exec", NS_SEND, "tc", "qdisc", "add", "dev", "dwb0", "root", *tbf])
        yield
    finally:
        subprocess.run(["ip", "netns", "del", NS_SEND], check=False)
        subprocess.run(["ip", "netns", "del", NS_RECV], check=False)


def parse_time(stderr: str) -> tuple[float, float, int]:
    match = re.findall(r"TIME ([\d.]+) ([\d.]+) ([\d.]+) (\d+)", stderr)
    if not match:
        raise RuntimeError(f"no /usr/bin/time line in: {stderr[-500:]}")
    wall, user, system, rss = match[-1]
    return float(wall), float(user) + float(system), int(rss)


def timed(command: list[str]) -> list[str]:
    return ["/usr/bin/time", "-f", TIME_FORMAT, *command]


def wait_port(link: Link, port: int) -> None:
    probe = link.wrap(
        "send", [PYTHON, "-c", f"import socket; socket.create_connection(('{link.receiver_ip}', {port}), 1)"]
    )
    for _ in range(100):
        if subprocess.run(probe, capture_output=True, check=False).returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"receiver on port {port} never came up")


def stop(process: subprocess.Popen[str]) -> str:
    # /usr/bin/time does not forward signals: stop the command it runs, then collect its report.
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
    for child in children:
        os.kill(int(child), signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    return stderr


def bench_nc(link: Link, source: Path, target_dir: Path) -> Measurement:
    port = 17401
    receiver = subprocess.Popen(
        link.wrap("recv", timed(["sh", "-c", f"nc -l -p {port} > {target_dir / 'nc.out'}"])),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.3)
    started = time.monotonic()
    sender = run(link.wrap("send", timed(["sh", "-c", f"nc -q 0 -N {link.receiver_ip} {port} < {source}"])))
    _, receiver_stderr = receiver.communicate(timeout=600)
    wall = time.monotonic() - started
    _, send_cpu, send_rss = parse_time(sender.stderr)
    _, recv_cpu, recv_rss = parse_time(receiver_stderr)
    size = source.stat().st_size
    assert (target_dir / "nc.out").stat().st_size == size, "nc lost data"
    return Measurement("nc", wall, size, size, send_cpu + recv_cpu, max(send_rss, recv_rss))


def bench_rsync(link: Link, source: Path, target_dir: Path, *, compress: str | None) -> Measurement:
    """rsync to its daemon in the other namespace: plain TCP, no ssh; ``compress`` is a -z choice."""
    port = 17402
    config = target_dir.parent / "rsyncd.conf"
    config.write_text(
        f"[bench]\npath = {target_dir}\nread only = false\nuse chroot = false\nuid = root\ngid = root\n"
    )
    daemon = subprocess.Popen(
        link.wrap(
            "recv", timed(["rsync", "--daemon", "--no-detach", f"--config={config}", f"--port={port}"])
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_port(link, port)
    flags = ["-W", "--stats", "--inplace"] + (["-z", f"--compress-choice={compress}"] if compress else [])
    started = time.monotonic()
    sender = run(
        link.wrap("send", timed(["rsync", *flags, str(source), f"rsync://{link.receiver_ip}:{port}/bench/"]))
    )
    wall = time.monotonic() - started
    daemon_stderr = stop(daemon)
    _, send_cpu, send_rss = parse_time(sender.stderr)
    _, recv_cpu, recv_rss = parse_time(daemon_stderr)
    sent = int(re.search(r"Total bytes sent: ([\d,]+)", sender.stdout).group(1).replace(",", ""))  # type: ignore[union-attr]
    return Measurement(
        f"rsync -z {compress}" if compress else "rsync",
        wall,
        source.stat().st_size,
        sent,
        send_cpu + recv_cpu,
        max(send_rss, recv_rss),
    )


def bench_dwcp(
    link: Link,
    source: Path,
    target_dir: Path,
    *,
    codec: str,
    streams: int,
    code: Path = REPO,
    label: str = "",
) -> Measurement:
    """``send`` to ``serve``, both run from the checkout at ``code`` (another revision: ``--compare-rev``)."""
    port = 17403
    env = {**os.environ, "DWCP_SECRET": SECRET, "PYTHONPATH": str(code)}
    server = subprocess.Popen(
        link.wrap(
            "recv",
            timed(
                [
                    PYTHON,
                    "-m",
                    "workers.dwcp",
                    "serve",
                    "--listen",
                    f"{link.receiver_ip}:{port}",
                    "--root",
                    str(target_dir),
                    "--node-name",
                    "bench",
                ]
            ),
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=code,  # python -m puts the working directory first on sys.path
    )
    wait_port(link, port)
    started = time.monotonic()
    sender = subprocess.run(
        link.wrap(
            "send",
            timed(
                [
                    PYTHON,
                    "-m",
                    "workers.dwcp",
                    "send",
                    str(source),
                    "--to",
                    f"{link.receiver_ip}:{port}",
                    "--name",
                    "dwcp.out",
                    "--node-name",
                    "bench",
                    "--dest-node",
                    "bench",
                    "--codec",
                    codec,
                    "--streams",
                    str(streams),
                ]
            ),
        ),
        capture_output=True,
        text=True,
        env=env,
        cwd=code,
        check=False,
    )
    wall = time.monotonic() - started
    server_stderr = stop(server)
    if sender.returncode != 0:
        raise RuntimeError(f"dwcp send failed: {sender.stderr[-2000:]}\nserver: {server_stderr[-2000:]}")
    summary = json.loads(sender.stdout.strip().splitlines()[-1])
    _, send_cpu, send_rss = parse_time(sender.stderr)
    _, recv_cpu, recv_rss = parse_time(server_stderr)
    label = f"dwcp{label} {codec} x{streams}"
    return Measurement(
        label,
        wall,
        summary["raw_bytes"],
        summary["wire_bytes"],
        send_cpu + recv_cpu,
        max(send_rss, recv_rss),
        summary["seconds"],
        summary["codec_mix"],
    )


def make_random(path: Path, size: int) -> Path:
    with path.open("wb") as handle:
        for _ in range(size // MiB):
            handle.write(os.urandom(MiB))
    return path


def make_zeros(path: Path, size: int) -> Path:
    with path.open("wb") as handle:  # written, not sparse: every tool must read the zeros
        block = bytes(MiB)
        for _ in range(size // MiB):
            handle.write(block)
    return path


def make_vm_disk(path: Path, size: int, scratch: Path) -> Path:
    """An ext4 image about 60 % full of this machine's libraries, binaries and documentation."""
    content = scratch / "disk-content"
    budget = int(size * 0.6)
    used = 0
    for tree in ("/usr/lib/x86_64-linux-gnu", "/usr/bin", "/usr/share/doc", "/usr/lib/python3"):
        for dirpath, _, filenames in os.walk(tree):
            for filename in filenames:
                origin = Path(dirpath) / filename
                if origin.is_symlink() or not origin.is_file():
                    continue
                length = origin.stat().st_size
                if used + length > budget:
                    break
                destination = content / origin.relative_to("/")
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(origin, destination)
                used += length
    run(["mke2fs", "-q", "-t", "ext4", "-d", str(content), "-F", str(path), f"{size // MiB}M"])
    shutil.rmtree(content)
    return path


def make_dataset(dataset: str, size: int, scratch: Path, manifests: dict[str, Any]) -> Path:
    """The data set's file (made once per size); ``manifests`` gets what ``mixed`` was made of."""
    if dataset == "qemu-ram":
        with guest_loop() as loop:
            return qemu_ram.capture_stream(qemu_ram.guest_image(REPO), scratch, loop)
    source = scratch / f"{dataset}-{size // MiB}M.bin"
    if not source.exists():
        if dataset == "mixed":
            manifests[source.name] = asdict(make_mixed(source, size))
        elif dataset == "random":
            make_random(source, size)
        elif dataset == "zeros":
            make_zeros(source, size)
        else:
            make_vm_disk(source, size, scratch)
    return source


@contextlib.contextmanager
def guest_loop() -> Iterator[EventLoopThread]:
    loop = EventLoopThread()
    try:
        yield loop
    finally:
        loop.close()


def live_migrations(link: Link, scratch: Path, streams: int) -> list[Measurement]:
    """The guest's RAM migrated live over the link: QEMU alone, and QEMU through a DWCP tunnel."""
    env = {**os.environ, "DWCP_SECRET": SECRET, "PYTHONPATH": str(REPO)}
    with guest_loop() as loop:
        counter = None if link.loopback else link.sent_on_link
        setup = qemu_ram.LinkSetup(link.wrap, link.receiver_ip, PYTHON, env, parse_time, streams, counter)
        runs = qemu_ram.live_migrations(qemu_ram.guest_image(REPO), scratch / "live", loop, setup)
    for run in runs:
        print(f"  {link.name} live {run['tool']}: {run['wall']:.2f}s", file=sys.stderr, flush=True)
    return [Measurement(**run) for run in runs]


def run_tools(
    link: Link,
    source: Path,
    scratch: Path,
    streams: int,
    wanted: set[str] | None = None,
    compare: tuple[str, Path] | None = None,
) -> list[Measurement]:
    """Every tool once, each into a fresh, empty target directory; ``compare``: DWCP of another revision too."""
    tools = {
        "nc": lambda target: bench_nc(link, source, target),
        "rsync": lambda target: bench_rsync(link, source, target, compress=None),
        "rsync -z lz4": lambda target: bench_rsync(link, source, target, compress="lz4"),
        "rsync -z zstd": lambda target: bench_rsync(link, source, target, compress="zstd"),
        "dwcp": lambda target: bench_dwcp(link, source, target, codec="auto", streams=streams),
    }
    if compare is not None:
        revision, checkout = compare
        tools["dwcp"] = lambda target: bench_dwcp(
            link, source, target, codec="auto", streams=streams, code=checkout, label=f"@{revision}"
        )
        tools["dwcp (this tree)"] = lambda target: bench_dwcp(
            link, source, target, codec="auto", streams=streams
        )
    results = []
    for name, bench in tools.items():
        if (
            wanted is not None and name.split(" (")[0] not in wanted and name != "nc"
        ):  # nc: every ratio's base
            continue
        target = scratch / "target"
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir()
        results.append(bench(target))
        shutil.rmtree(target)
        print(f"  {link.name} {source.name} {name}: {results[-1].wall:.2f}s", file=sys.stderr, flush=True)
    return results


def median_measurement(runs: list[Measurement]) -> Measurement:
    """One tool's runs as one row: medians of the figures, the largest peak RSS, the median run's codecs."""
    by_wall = sorted(runs, key=lambda m: m.wall)
    middle = by_wall[len(by_wall) // 2]
    seconds = [m.transfer_seconds for m in runs if m.transfer_seconds is not None]
    return Measurement(
        middle.tool,
        statistics.median(m.wall for m in runs),
        middle.raw_bytes,
        int(statistics.median(m.wire_bytes for m in runs)),
        statistics.median(m.cpu for m in runs),
        max(m.peak_rss_kib for m in runs),
        statistics.median(seconds) if seconds else None,
        middle.codec_mix,
        middle.downtime_ms,
    )


def _spread(values: list[float], digits: int, suffix: str = "") -> str:
    if len(values) < 2:
        return ""
    return f" ({min(values):.{digits}f}-{max(values):.{digits}f}{suffix})"


def table(link: Link, dataset: str, runs: list[list[Measurement]]) -> str:
    """Medians over the runs; each ratio is the median of the per-run ratios (same moments of the machine)."""
    tools = [m.tool for m in runs[0]]
    per_tool = {tool: [next(m for m in run if m.tool == tool) for run in runs] for tool in tools}
    rows = {tool: median_measurement(measured) for tool, measured in per_tool.items()}
    peer_columns = [tool for tool in tools if "dwcp" not in tool and not tool.startswith("qemu")]

    def ratios(tool: str, peer: str) -> list[float]:
        return [mine.rate / theirs.rate for mine, theirs in zip(per_tool[tool], per_tool[peer], strict=True)]

    width = max(len(tool) for tool in tools) + 2
    ratio_width = 18 if len(runs) > 1 else 8
    lines = [
        f"\n{link.name} / {dataset} ({runs[0][0].raw_bytes / MiB:.0f} MiB), "
        f"{len(runs)} run{'s' if len(runs) > 1 else ''}: medians (range)",
        f"{'tool':<{width}}{'wall s':>20}{'eff MB/s':>10}{'good MB/s':>10}{'wire MB':>9}"
        + "".join(f"{'vs ' + peer:>{max(ratio_width, len(peer) + 5)}}" for peer in peer_columns)
        + f"{'CPU s':>8}{'RSS MiB':>9}{'xfer s':>8}",
    ]
    for tool in tools:
        m = rows[tool]
        wall = f"{m.wall:.2f}{_spread([r.wall for r in per_tool[tool]], 2)}"
        speedups = ""
        for peer in peer_columns:
            values = ratios(tool, peer)
            cell = f"{statistics.median(values):.2f}x{_spread(values, 2)}"
            speedups += f"{cell:>{max(ratio_width, len(peer) + 5)}}"
        rss = f"{m.peak_rss_kib / 1024:>9.1f}" if m.peak_rss_kib else f"{'-':>9}"
        lines.append(
            f"{tool:<{width}}{wall:>20}{m.rate:>10.1f}{m.goodput:>10.1f}{m.wire_bytes / 1e6:>9.1f}"
            f"{speedups}{m.cpu:>8.2f}{rss}"
            + (f"{m.transfer_seconds:>8.2f}" if m.transfer_seconds is not None else "")
        )
    for tool in tools:
        m = rows[tool]
        if m.codec_mix:
            mix = ", ".join(f"{codec} {raw / m.raw_bytes:.0%}" for codec, raw in sorted(m.codec_mix.items()))
            lines.append(f"  {tool} codec mix of the median run (share of data bytes): {mix}")
        if m.downtime_ms is not None:
            lines.append(f"  {tool}: guest downtime {m.downtime_ms} ms (QEMU's figure)")
    return "\n".join(lines)


def commit_id() -> str:
    head = run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO).stdout.strip()
    dirty = run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO).stdout.strip()
    return head + ("-dirty" if dirty else "")


def write_json(args: argparse.Namespace, rows: list[dict[str, Any]], manifests: dict[str, Any]) -> Path:
    now = datetime.datetime.now(datetime.UTC)
    path = REPO / "bench" / "results" / f"dwcp-{now:%Y-%m-%dT%H%M%S}-{commit_id()}.json"
    document = {
        "args": vars(args),
        "load_average": os.getloadavg(),
        "finished": now.isoformat(),
        "mixed_manifests": manifests,
        "rows": rows,
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller files, loopback and 1 Gbit only")
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--links", default="loopback,unshaped,1gbit,100mbit", help="comma-separated subset")
    parser.add_argument(
        "--datasets", default="random,zeros,vm-disk,mixed,qemu-ram", help="comma-separated subset"
    )
    parser.add_argument(
        "--tools", default="nc,rsync,rsync -z lz4,rsync -z zstd,dwcp,qemu", help="comma-separated subset"
    )
    parser.add_argument(
        "--size-mib", type=int, default=None, help="one size for every file data set (default: per link)"
    )
    parser.add_argument("--mixed-mib", type=int, default=512, help="size of the mixed data set on every link")
    parser.add_argument("--runs", type=int, default=1, help="runs per link and data set (tables: medians)")
    parser.add_argument(
        "--compare-rev", default=None, help="also run DWCP as of this git revision (before/after in one run)"
    )
    args = parser.parse_args()
    if args.runs < 1 or args.mixed_mib < 1 or (args.size_mib is not None and args.size_mib < 1):
        parser.error("--runs, --mixed-mib and --size-mib must be positive")
    wanted_links = set(args.links.split(","))
    wanted_datasets = set(args.datasets.split(","))
    wanted_tools = set(args.tools.split(","))
    if os.geteuid() != 0:
        print("bench: run as root (network namespaces and tc need it)", file=sys.stderr)
        return 2
    scale = 4 if args.quick else 1
    links = [
        Link("loopback", None, True),
        Link("veth unshaped", None, False),
        Link("veth 1gbit", "1gbit", False),
    ]
    if not args.quick:
        links.append(Link("veth 100mbit", "100mbit", False))
    mixed = args.mixed_mib * MiB
    sizes = {  # per link: keep each nc run to a few seconds (qemu-ram: the guest's stream, whatever it is)
        "loopback": {
            "random": 512 * MiB,
            "zeros": 1024 * MiB,
            "vm-disk": 512 * MiB,
            "mixed": mixed,
            "qemu-ram": 0,
        },
        "veth unshaped": {
            "random": 512 * MiB,
            "zeros": 512 * MiB,
            "vm-disk": 512 * MiB,
            "mixed": mixed,
            "qemu-ram": 0,
        },
        "veth 1gbit": {
            "random": 256 * MiB,
            "zeros": 256 * MiB,
            "vm-disk": 256 * MiB,
            "mixed": mixed,
            "qemu-ram": 0,
        },
        "veth 100mbit": {
            "random": 48 * MiB,
            "zeros": 48 * MiB,
            "vm-disk": 64 * MiB,
            "mixed": mixed,
            "qemu-ram": 0,
        },
    }
    report: list[str] = []
    rows: list[dict[str, Any]] = []
    manifests: dict[str, Any] = {}
    with (
        tempfile.TemporaryDirectory(prefix="dwcp-bench-", dir="/var/tmp") as scratch_name,
        contextlib.ExitStack() as stack,  # the compared checkout goes before its directory does
    ):
        scratch = Path(scratch_name)
        compare = None
        if args.compare_rev:
            checkout = scratch / "compare-rev"
            run(["git", "worktree", "add", "--detach", "-q", str(checkout), args.compare_rev], cwd=REPO)
            stack.callback(run, ["git", "worktree", "remove", "--force", str(checkout)], cwd=REPO)
            compare = (
                run(["git", "rev-parse", "--short", args.compare_rev], cwd=REPO).stdout.strip(),
                checkout,
            )
        for link in links:
            if link.name.split()[-1] not in wanted_links:
                continue
            for dataset, full_size in sizes[link.name].items():
                if dataset not in wanted_datasets:
                    continue
                size = args.size_mib * MiB if args.size_mib else full_size // scale
                source = make_dataset(dataset, size, scratch, manifests)
                context = contextlib.nullcontext() if link.loopback else namespaces(link.rate)
                runs: list[list[Measurement]] = []
                with context:
                    for _ in range(args.runs):
                        results = run_tools(link, source, scratch, args.streams, wanted_tools, compare)
                        if dataset == "qemu-ram" and "qemu" in wanted_tools:
                            results += live_migrations(link, scratch, args.streams)
                        runs.append(results)
                report.append(table(link, dataset, runs))
                print(report[-1], flush=True)
                rows += [
                    {"link": link.name, "dataset": dataset, "run": number, **asdict(m)}
                    for number, results in enumerate(runs)
                    for m in results
                ]
    print(f"\nJSON: {write_json(args, rows, manifests).relative_to(REPO)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
