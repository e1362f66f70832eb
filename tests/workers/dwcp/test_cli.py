"""The operator CLI, run as real processes: ``python -m workers.dwcp serve`` and ``send``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import SECRET, MiB, sha256_of, write_mixed_file

REPO = Path(__file__).resolve().parents[3]


def environment(**overrides: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "DWCP_SECRET": SECRET}
    env.update(overrides)
    return env


@pytest.fixture
def served(root: Path) -> Iterator[str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "workers.dwcp", "serve", "--listen", "127.0.0.1:0", "--root", str(root)],
        cwd=REPO,
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    banner = json.loads(process.stdout.readline())
    yield banner["listening"]
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=10) == 0


def test_send_delivers_a_file_and_prints_a_json_summary(served: str, root: Path, tmp_path: Path) -> None:
    source = write_mixed_file(tmp_path / "disk.img", 9 * MiB)
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "workers.dwcp",
            "send",
            str(source),
            "--to",
            served,
            "--name",
            "images/disk.img",
            "--streams",
            "3",
            "--codec",
            "auto",
            "--bandwidth-limit-mbps",
            "4000",
        ],
        cwd=REPO,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 0, completed.stderr
    summary = json.loads(completed.stdout.strip().splitlines()[-1])
    assert summary["raw_bytes"] == 9 * MiB
    assert 0 < summary["wire_bytes"] < summary["raw_bytes"]
    assert summary["streams"] == 3
    assert summary["seconds"] > 0
    assert sum(summary["codec_mix"].values()) == 9 * MiB
    assert sha256_of(root / "images/disk.img") == sha256_of(source)


def test_send_outside_the_root_fails_with_a_message(served: str, root: Path, tmp_path: Path) -> None:
    source = tmp_path / "small"
    source.write_bytes(b"hello")
    completed = subprocess.run(
        [sys.executable, "-m", "workers.dwcp", "send", str(source), "--to", served, "--name", "../../etc/x"],
        cwd=REPO,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert completed.returncode == 1
    assert "outside" in completed.stderr or "relative path" in completed.stderr


@pytest.mark.parametrize(
    "command",
    [["serve", "--listen", "127.0.0.1:0", "--root", "."], ["send", "x", "--to", "h:1", "--name", "n"]],
)
def test_a_missing_secret_is_a_clear_usage_error(command: list[str]) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "workers.dwcp", *command],
        cwd=REPO,
        env=environment(DWCP_SECRET=""),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert completed.returncode == 2
    assert "DWCP_SECRET is not set" in completed.stderr
