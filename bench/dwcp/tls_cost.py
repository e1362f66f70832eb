"""What DWCP's optional mutual TLS costs: the same transfer with and without it.

    .venv/bin/python -m bench.dwcp.tls_cost [--size-mib 1024] [--runs 3] [--streams 4] [--dir /dev/shm]
        [--link loopback|1gbit|100mbit]

Random (incompressible) data, so every byte is sealed and opened; the CLI's ``serve`` and ``send``
as separate processes, a fresh server per run, plain and TLS runs alternating so that load from
other work on the machine hits both alike. Files live under ``--dir`` (tmpfs by default: the
receiver's durable write would otherwise hide the CPU cost). Reported per mode: DWCP's own
transfer time as MB/s (without interpreter start-up) and the CPU seconds of both processes
(user + system, start-up included), each the median of ``--runs``. No root needed on loopback;
``--link 1gbit`` or ``100mbit`` runs the two ends in bench-dwcp's namespaces over a ``tc tbf`` link
(root), where the question is whether sealing keeps up with the wire.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.dwcp.bench import Link, namespaces

REPO = Path(__file__).resolve().parents[2]
SECRET = "bench-tls-cost-secret-0123456789"
SOURCE, DEST = "bench-source", "bench-dest"
MiB = 1024 * 1024


def openssl(*arguments: str | Path) -> None:
    subprocess.run(["openssl", *map(str, arguments)], check=True, capture_output=True)


def make_certificates(directory: Path) -> dict[str, dict[str, str]]:
    """A CA and one certificate per node (DNS SAN = node name), as an operator would issue them."""
    ca, ca_key = directory / "ca.pem", directory / "ca.key"
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl("req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "1", "-subj", "/CN=bench CA",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign")  # fmt: skip
    environments = {}
    for node in (SOURCE, DEST):
        cert, key, request, extensions = (
            directory / f"{node}.{suffix}" for suffix in ("pem", "key", "csr", "ext")
        )
        extensions.write_text(f"subjectAltName=DNS:{node}\nextendedKeyUsage=serverAuth,clientAuth\n")
        openssl("req", "-new", *ec, "-keyout", key, "-out", request, "-subj", f"/CN={node}")
        openssl("x509", "-req", "-in", request, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert,
                "-days", "1", "-extfile", extensions)  # fmt: skip
        environments[node] = {"DWCP_TLS_CERT": str(cert), "DWCP_TLS_KEY": str(key), "DWCP_TLS_CA": str(ca)}
    return environments


def cpu_seconds(process: subprocess.Popen[str]) -> float:
    """Wait for ``process`` and return its user + system CPU time."""
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_utime + usage.ru_stime


def one_run(
    link: Link, source: Path, root: Path, streams: int, tls: dict[str, dict[str, str]] | None
) -> tuple[float, float]:
    base = {key: value for key, value in os.environ.items() if not key.startswith("DWCP_TLS_")}
    base |= {"DWCP_SECRET": SECRET, "PYTHONPATH": str(REPO)}
    serve = [
        sys.executable,
        "-m",
        "workers.dwcp",
        "serve",
        "--listen",
        f"{link.receiver_ip}:0",
        "--root",
        str(root),
    ]
    server = subprocess.Popen(
        link.wrap("recv", [*serve, "--node-name", DEST]),
        env=base | (tls[DEST] if tls else {}),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert server.stdout is not None
    banner = json.loads(server.stdout.readline())
    assert banner["tls"] is (tls is not None)
    sender = subprocess.Popen(
        link.wrap("send", [sys.executable, "-m", "workers.dwcp", "send", str(source), "--to", banner["listening"],
                           "--name", "received.bin", "--node-name", SOURCE, "--dest-node", DEST,
                           "--streams", str(streams)]),
        env=base | (tls[SOURCE] if tls else {}),
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert sender.stdout is not None
    result = json.loads(sender.stdout.read())
    cpu = cpu_seconds(sender)
    server.send_signal(signal.SIGTERM)
    cpu += cpu_seconds(server)
    if sender.returncode != 0 or server.returncode != 0:
        raise SystemExit(f"a run failed: send exit {sender.returncode}, serve exit {server.returncode}")
    (root / "received.bin").unlink()
    return result["raw_bytes"] / result["seconds"] / 1e6, cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--streams", type=int, default=4)
    tmpfs = Path("/dev/shm")  # noqa: S108 - tmpfs on purpose (see the docstring); a private mkdtemp inside
    parser.add_argument("--dir", type=Path, default=tmpfs)
    parser.add_argument("--link", choices=["loopback", "1gbit", "100mbit"], default="loopback")
    args = parser.parse_args()
    link = Link(args.link, None if args.link == "loopback" else args.link, args.link == "loopback")
    work = Path(tempfile.mkdtemp(prefix="dwcp-tls-cost-", dir=args.dir))
    try:
        tls = make_certificates(work)
        source = work / "random.bin"
        with source.open("wb") as handle:
            for _ in range(args.size_mib // 64):
                handle.write(os.urandom(64 * MiB))
            handle.write(os.urandom(args.size_mib % 64 * MiB))
        root = work / "root"
        root.mkdir()
        results: dict[str, list[tuple[float, float]]] = {"plain": [], "tls": []}
        with contextlib.nullcontext() if link.loopback else namespaces(args.link):
            for run in range(args.runs):
                for mode in ("plain", "tls"):
                    rate, cpu = one_run(link, source, root, args.streams, tls if mode == "tls" else None)
                    results[mode].append((rate, cpu))
                    print(f"run {run + 1} {mode:5}: {rate:7.1f} MB/s, {cpu:5.2f} CPU s", flush=True)
        print(
            f"\n{args.size_mib} MiB random, {args.streams} streams, {args.link}, {args.runs} runs each (medians)"
        )
        print("| mode | MB/s | CPU s (both ends) |\n|---|---|---|")
        for mode, rows in results.items():
            rates, cpus = zip(*rows, strict=True)
            print(f"| {mode} | {statistics.median(rates):.0f} | {statistics.median(cpus):.2f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
