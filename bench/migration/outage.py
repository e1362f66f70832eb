"""What a client sees of a VM's network while it moves: a ping every 10 ms and one TCP connection.

Runs where the client is (``ip netns exec <client ns> python -m bench.migration.outage --target IP``)
until its standard input closes or it gets SIGTERM, then prints one JSON object:

    {"ping": {"sent": N, "received": N, "longest_gap_ms": ms},
     "tcp": {"lines": N, "first": seq, "last": seq, "in_order": bool, "closed": "" | why,
             "longest_gap_ms": ms}}

The ping is iputils' ``ping -D -i 0.01``; its longest gap is the longest time between two replies,
which is the network outage a user sees (at least the interval). The TCP side connects to the test
guest's counter service (a line with the next integer every 10 ms): ``in_order`` says every line was
the previous one plus one, ``closed`` why the connection ended before the probe did (reset, end of
stream), empty when it stayed open.
"""

import argparse
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
REPLY = re.compile(rb"^\[(\d+\.\d+)\] \d+ bytes from .*icmp_seq=(\d+)")
SENT = re.compile(rb"^(\d+) packets transmitted, (\d+) received")


@dataclass
class Gaps:
    """The longest time between consecutive events (seconds, monotonic or epoch: one clock)."""

    last: float | None = None
    longest: float = 0.0
    count: int = 0

    def event(self, at: float) -> None:
        if self.last is not None:
            self.longest = max(self.longest, at - self.last)
        self.last = at
        self.count += 1


@dataclass
class TcpCounter:
    gaps: Gaps = field(default_factory=Gaps)
    first: int | None = None
    last: int | None = None
    in_order: bool = True
    closed: str = ""

    def follow(self, target: str, port: int, stop: threading.Event) -> None:
        try:
            sock = socket.create_connection((target, port), timeout=10)
        except OSError as exc:
            self.closed = f"connect: {exc}"
            return
        sock.settimeout(0.5)
        pending = b""
        with sock:
            while not stop.is_set():
                try:
                    data = sock.recv(65536)
                except TimeoutError:
                    continue
                except OSError as exc:
                    self.closed = f"{type(exc).__name__}: {exc}"
                    return
                if not data:
                    self.closed = "end of stream"
                    return
                now = time.monotonic()
                pending += data
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self._line(line.strip(), now)

    def _line(self, line: bytes, at: float) -> None:
        if not line.isdigit():
            return
        value = int(line)
        if self.last is not None and value != self.last + 1:
            self.in_order = False
        if self.first is None:
            self.first = value
        self.last = value
        self.gaps.event(at)


def run(target: str, port: int, interval: float) -> dict[str, Any]:
    stop = threading.Event()
    counter = TcpCounter()
    reader = threading.Thread(target=counter.follow, args=(target, port, stop), daemon=True)
    reader.start()
    ping = subprocess.Popen(
        ["ping", "-D", "-n", "-i", f"{interval:g}", "-W", "1", target],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    replies = Gaps()
    sent = received = 0

    def read_ping() -> None:
        nonlocal sent, received
        assert ping.stdout is not None
        for raw in ping.stdout:
            match = REPLY.match(raw)
            if match:
                replies.event(float(match.group(1)))
            totals = SENT.match(raw)
            if totals:
                sent, received = int(totals.group(1)), int(totals.group(2))

    ping_reader = threading.Thread(target=read_ping, daemon=True)
    ping_reader.start()
    ended = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: ended.set())

    def until_stdin_closes() -> None:
        sys.stdin.read()
        ended.set()

    threading.Thread(target=until_stdin_closes, daemon=True).start()
    ended.wait()
    stop.set()
    ping.send_signal(signal.SIGINT)  # prints its totals
    ping.wait(timeout=10)
    ping_reader.join(timeout=5)
    reader.join(timeout=5)
    return {
        "ping": {"sent": sent, "received": received, "longest_gap_ms": round(replies.longest * 1000, 1)},
        "tcp": {
            "lines": counter.gaps.count,
            "first": counter.first,
            "last": counter.last,
            "in_order": counter.in_order,
            "closed": counter.closed,
            "longest_gap_ms": round(counter.gaps.longest * 1000, 1),
        },
    }


class Probe:
    """This module run in a network namespace, from its start to :meth:`finish`."""

    def __init__(self, netns: str, target: str, port: int = 9000, interval: float = 0.01) -> None:
        command = ["ip", "netns", "exec", netns, sys.executable, "-m", "bench.migration.outage"]
        self.process = subprocess.Popen(
            [*command, "--target", target, "--port", str(port), "--interval", f"{interval:g}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
        )

    def finish(self) -> dict[str, Any]:
        out, err = self.process.communicate(input=b"", timeout=60)
        if self.process.returncode != 0 or not out.strip():
            raise RuntimeError(f"outage probe failed ({self.process.returncode}): {err.decode()[-2000:]}")
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--interval", type=float, default=0.01)
    args = parser.parse_args()
    print(json.dumps(run(args.target, args.port, args.interval)), flush=True)


if __name__ == "__main__":
    main()
