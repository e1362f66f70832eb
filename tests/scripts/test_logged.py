"""scripts/logged.py: a `make run` process's whole output in its log file, warnings and errors on the console."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROGRAM = r"""
import sys
print("celery banner line on stdout")
err = sys.stderr
err.write("2026-01-01 10:00:00,000 INFO workers.node ready\n")
err.write("[2026-01-01 10:00:01,000: INFO/MainProcess] Task received\n")
err.write("[2026-01-01 10:00:02,000: ERROR/MainProcess] Task failed\n")
err.write("Traceback (most recent call last):\n  ValueError: boom\n")
err.write("2026-01-01 10:00:03,000 DEBUG apps.vms quiet detail\n  continued quietly\n")
print("[WARNING] Configured number of workers is high", flush=True)
print("[I 260101 10:00:04 web:1] 200 GET /", flush=True)
err.write("novacron node: cannot serve DWCP on 127.0.0.1:7001\n")
sys.exit(3)
"""


def test_the_console_gets_warnings_errors_and_stray_stderr_and_the_file_gets_everything(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, "scripts/logged.py", "demo", sys.executable, "-c", PROGRAM],
        cwd=ROOT, env=os.environ | {"NOVACRON_VAR_DIR": str(tmp_path)}, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 3
    console = result.stdout.splitlines()
    assert sorted(console) == sorted([
        "[2026-01-01 10:00:02,000: ERROR/MainProcess] Task failed",
        "Traceback (most recent call last):",
        "  ValueError: boom",
        "[WARNING] Configured number of workers is high",
        "novacron node: cannot serve DWCP on 127.0.0.1:7001",
    ])  # fmt: skip
    logged = (tmp_path / "log" / "demo.log").read_text().splitlines()
    assert len(logged) == 11 and "celery banner line on stdout" in logged and "  continued quietly" in logged


RESTARTED = r"""
import pathlib, sys, time
marker = pathlib.Path(sys.argv[1])
if not marker.exists():
    marker.write_text("ran")
    time.sleep(float(sys.argv[2]))
    sys.exit(1)  # as a Celery worker that gave up on its broker: unasked, after running a while
print("second life", flush=True)
sys.exit(4)  # a startup failure: not started again
"""


def test_a_command_that_exits_unasked_after_running_a_while_is_started_again(tmp_path: Path):
    sys.path.insert(0, str(ROOT / "scripts"))
    from logged import MIN_UPTIME_SECONDS

    command = [sys.executable, "-c", RESTARTED, str(tmp_path / "marker"), str(MIN_UPTIME_SECONDS + 0.5)]
    result = subprocess.run(
        [sys.executable, "scripts/logged.py", "demo", *command],
        cwd=ROOT, env=os.environ | {"NOVACRON_VAR_DIR": str(tmp_path)}, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 4
    assert "logged.py: demo exited (1) unasked; starting it again" in result.stdout
    assert "second life" in (tmp_path / "log" / "demo.log").read_text()
