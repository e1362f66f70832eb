"""The operator CLI, run as real processes: ``python -m workers.dwcp serve`` and ``send``."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
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


def _serve_tunnels(tunnel_root: Path, root: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "workers.dwcp", "serve", "--listen", "127.0.0.1:0", "--root", str(root),
         "--tunnel-root", str(tunnel_root)],
        cwd=REPO, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _tunnel(address: str, listen: Path, target: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "workers.dwcp", "tunnel", "--listen-unix", str(listen), "--to", address,
         "--target", target, "--streams", "3"],
        cwd=REPO, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_tunnel_joins_a_local_socket_to_one_under_the_servers_tunnel_root(root: Path, tmp_path: Path) -> None:
    sockets = tmp_path / "s"
    sockets.mkdir()
    target = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    target.bind(str(sockets / "t.sock"))
    target.listen(1)
    received: list[bytes] = []

    def answer_with_digest() -> None:  # the far end: read to EOF, answer with what it got
        connection, _ = target.accept()
        with connection:
            digest = hashlib.sha256()
            while chunk := connection.recv(1 << 16):
                digest.update(chunk)
                received.append(chunk)
            connection.sendall(digest.hexdigest().encode())

    responder = threading.Thread(target=answer_with_digest, daemon=True)
    responder.start()
    server = _serve_tunnels(sockets, root)
    assert server.stdout is not None
    address = json.loads(server.stdout.readline())["listening"]
    tunnel = _tunnel(address, tmp_path / "l.sock", "t.sock")
    try:
        assert tunnel.stdout is not None
        assert json.loads(tunnel.stdout.readline())["listening"] == str(tmp_path / "l.sock")
        payload = os.urandom(3 * MiB) + bytes(2 * MiB) + b"tail"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(tmp_path / "l.sock"))
            client.sendall(payload)
            client.shutdown(socket.SHUT_WR)
            answer = b"".join(iter(lambda: client.recv(1 << 16), b""))
        assert answer.decode() == hashlib.sha256(payload).hexdigest()
        output, errors = tunnel.communicate(timeout=30)
        assert tunnel.returncode == 0, errors
        result = json.loads(output.strip().splitlines()[-1])
        assert result["bytes_sent"] == len(payload)
        assert result["bytes_received"] == 64
        assert result["streams"] == 3
        assert 0 < result["wire_bytes"] < len(payload)  # the zeros went as zero frames
        assert b"".join(received) == payload
    finally:
        for process in (tunnel, server):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            process.wait(timeout=15)
        target.close()
    assert server.returncode == 0


def test_tunnel_to_a_target_outside_the_tunnel_root_fails_with_a_message(root: Path, tmp_path: Path) -> None:
    sockets = tmp_path / "s"
    sockets.mkdir()
    server = _serve_tunnels(sockets, root)
    assert server.stdout is not None
    address = json.loads(server.stdout.readline())["listening"]
    tunnel = _tunnel(address, tmp_path / "l.sock", "../escape.sock")
    try:
        assert tunnel.stdout is not None
        tunnel.stdout.readline()  # listening
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(tmp_path / "l.sock"))
            _, errors = tunnel.communicate(timeout=30)
        assert tunnel.returncode == 1
        assert "transfer failed" in errors
        assert "outside" in errors or "relative path" in errors
    finally:
        for process in (tunnel, server):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            process.wait(timeout=15)
