"""``python scripts/logged.py NAME COMMAND...``: one `make run` process (a Procfile line), its log in a file.

Everything the command prints, stdout and stderr, is appended to ``$NOVACRON_VAR_DIR/log/NAME.log``.
The console (honcho's output) gets only what a person at it should see: log records at WARNING or
above with their continuation lines (tracebacks), and whatever the command writes to stderr outside
a log record (a crash before logging is set up, a usage error). INFO and DEBUG records with their
indented continuation lines, and other stdout (Celery's banner), stay in the file. Record headers
are recognised in the formats of the processes `make run` starts: NovaCron's own
(settings/logging.py, node workers), Celery, granian and Flower (tornado).

It does not act on SIGINT and SIGTERM: honcho signals the whole process group, so the command gets
them itself, and this wrapper exits with the command's status once the command has closed its output.
A command that exits without being told to, after running ``MIN_UPTIME_SECONDS``, is started again,
as Compose's ``restart`` does (Celery's workers exit when kombu fails on a Redis restart, and honcho
would stop the whole system for one process); one that fails sooner (a startup error) ends it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

MIN_UPTIME_SECONDS = 5.0  # a command that ran this long and exited unasked is started again
RESTART_DELAY_SECONDS = 1.0
QUIET_LEVELS = frozenset({"DEBUG", "INFO", "D", "I"})
RECORD_HEADERS = (
    re.compile(rb"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (?P<level>[A-Z]+) "),  # NovaCron
    re.compile(rb"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+: (?P<level>[A-Z]+)/"),  # Celery
    re.compile(rb"^\[(?P<level>[A-Z]+)\] "),  # granian
    re.compile(rb"^\[(?P<level>[DIWEC]) \d{6} "),  # tornado (Flower)
)


def record_level(line: bytes) -> str | None:
    """The level of the log record ``line`` starts, or None when it starts none."""
    for header in RECORD_HEADERS:
        match = header.match(line)
        if match:
            return match["level"].decode()
    return None


class Splitter:
    """Decides line by line, per stream, whether a line goes to the console besides the log file."""

    def __init__(self, log: IO[bytes], console: IO[bytes]) -> None:
        self.log = log
        self.console = console
        self.lock = threading.Lock()
        self.console_open = True

    def write(self, line: bytes, *, shown: bool) -> None:
        """``line`` to the file, and to the console if ``shown``."""
        with self.lock:
            self.log.write(line)
            self.log.flush()
            if shown and self.console_open:
                try:
                    self.console.write(line)
                    self.console.flush()
                except OSError:  # honcho stopped reading first: the file still gets the rest
                    self.console_open = False

    def pump(self, stream: IO[bytes], *, is_stderr: bool) -> None:
        record_shown: bool | None = None  # whether the record the last lines belong to is shown
        for line in iter(stream.readline, b""):
            level = record_level(line)
            if level is not None:
                record_shown = level not in QUIET_LEVELS
            elif record_shown is False and not line[:1].isspace():
                record_shown = None  # a quiet record continues on indented lines only
            self.write(line, shown=is_stderr if record_shown is None else record_shown)


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: logged.py NAME COMMAND [ARG...]", file=sys.stderr)
        return 2
    name, command = argv[0], argv[1:]
    log_dir = Path(os.environ.get("NOVACRON_VAR_DIR", "var")) / "log"
    log_dir.mkdir(parents=True, exist_ok=True)
    stopping = threading.Event()
    # Handlers, not SIG_IGN: the commands inherit the default action (exec resets handlers).
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    with (log_dir / f"{name}.log").open("ab") as log:
        splitter = Splitter(log, sys.stdout.buffer)
        while True:
            started = time.monotonic()
            returncode = _run(command, splitter)
            if stopping.is_set() or time.monotonic() - started < MIN_UPTIME_SECONDS:
                break
            notice = f"logged.py: {name} exited ({returncode}) unasked; starting it again\n".encode()
            splitter.write(notice, shown=True)
            time.sleep(RESTART_DELAY_SECONDS)
            if stopping.is_set():
                break
    return 128 - returncode if returncode < 0 else returncode


def _run(command: list[str], splitter: Splitter) -> int:
    """Run ``command`` once, its output through ``splitter``; its exit status."""
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert child.stdout is not None and child.stderr is not None
    stderr_pump = threading.Thread(
        target=splitter.pump, args=(child.stderr,), kwargs={"is_stderr": True}, daemon=True
    )
    stderr_pump.start()
    splitter.pump(child.stdout, is_stderr=False)
    stderr_pump.join()
    return child.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
