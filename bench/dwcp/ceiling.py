"""What this machine allows a loopback file transfer, part by part (issue 4's loopback targets).

A DWCP file transfer on one host reads the file (a copy out of the page cache), hashes it, sends it
over loopback TCP (a copy in, a copy out), hashes it again and writes it (a copy into fresh page
cache) before an fsync. This measures each of those parts alone, in this process, so a table can
say which one caps the whole:

* page-cache read: ``pread`` of a cached file in 1 MiB chunks;
* xxh3-64 of 1 MiB buffers (what both ends do per chunk);
* loopback TCP memory to memory: one sender thread and one receiver thread (``recv_into`` a reused
  buffer), 1 MiB sends, 8 MiB socket buffers, the shape of one DWCP stream without any protocol;
* fresh-file write: 1 MiB ``pwrite`` calls into a new file, then ``fsync``, as the receiver does.

``.venv/bin/python -m bench.dwcp.ceiling [--mib 1024] [--runs 3]`` prints medians in MB/s.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import xxhash

MiB = 1024 * 1024


def page_cache_read(path: Path, size: int) -> float:
    fd = os.open(path, os.O_RDONLY)
    try:
        started = time.perf_counter()
        for offset in range(0, size, MiB):
            os.pread(fd, MiB, offset)
        return time.perf_counter() - started
    finally:
        os.close(fd)


def hashing(size: int) -> float:
    block = os.urandom(MiB)
    started = time.perf_counter()
    for _ in range(size // MiB):
        xxhash.xxh3_64_intdigest(block)
    return time.perf_counter() - started


def loopback_tcp(size: int) -> float:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def receive() -> None:
        connection, _ = listener.accept()
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * MiB)
        buffer = memoryview(bytearray(MiB))
        with connection:
            while connection.recv_into(buffer):
                pass

    receiver = threading.Thread(target=receive)
    receiver.start()
    block = os.urandom(MiB)
    with socket.create_connection(("127.0.0.1", port)) as sender:
        sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 * MiB)
        started = time.perf_counter()
        for _ in range(size // MiB):
            sender.sendall(block)
        sender.shutdown(socket.SHUT_WR)
        receiver.join()
        elapsed = time.perf_counter() - started
    listener.close()
    return elapsed


def fresh_file_write(directory: Path, size: int) -> float:
    block = os.urandom(MiB)
    target = directory / "write-ceiling.out"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        started = time.perf_counter()
        for offset in range(0, size, MiB):
            os.pwrite(fd, block, offset)
        os.fsync(fd)
        return time.perf_counter() - started
    finally:
        os.close(fd)
        target.unlink()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mib", type=int, default=1024, help="bytes moved per part and run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"), help="where the files go")  # noqa: S108
    args = parser.parse_args()
    size = args.mib * MiB
    with tempfile.TemporaryDirectory(prefix="dwcp-ceiling-", dir=args.dir) as scratch_name:
        scratch = Path(scratch_name)
        source = scratch / "source"
        with source.open("wb") as handle:
            for _ in range(args.mib):
                handle.write(os.urandom(MiB))
        page_cache_read(source, size)  # warm: the transfer's source is cached too
        parts: dict[str, Callable[[], float]] = {
            "page-cache read (pread 1 MiB)": lambda: page_cache_read(source, size),
            "xxh3-64 of 1 MiB buffers": lambda: hashing(size),
            "loopback TCP, memory to memory": lambda: loopback_tcp(size),
            "fresh-file write + fsync": lambda: fresh_file_write(scratch, size),
        }
        print(f"{'part':<34}{'MB/s (median)':>15}{'runs':>30}")
        for name, part in parts.items():
            rates = [size / part() / 1e6 for _ in range(args.runs)]
            runs = ", ".join(f"{rate:.0f}" for rate in rates)
            print(f"{name:<34}{statistics.median(rates):>15.0f}{runs:>30}", flush=True)
    print(f"(load average {os.getloadavg()[0]:.2f}; {os.cpu_count()} cores)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
