"""The Debian 12 cloud image end to end: built from Debian's packages, booted under TCG by a real node
worker with a cloud-init seed (hostname, SSH key), reached by SSH from the provider LAN, and live-migrated
to the other node while one SSH session keeps streaming."""

import itertools
import json
import secrets
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from apps.migrations.models import Migration
from apps.vms.models import VM, Image
from tests.netlab import Namespace, NetLab
from tests.workers.node.conftest import Cluster, wait_for
from workers.guest import debian

BOOT_TIMEOUT = 900.0  # to a working SSH login under TCG on a loaded 2-core machine (~2-4 min measured)
MIGRATION_TIMEOUT = 600.0


def test_the_image_is_a_compressed_qcow2_of_the_current_recipe_and_a_rebuild_is_skipped(debian_qcow2: Path):
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(debian_qcow2)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == debian.DISK_SIZE
    manifest = json.loads((debian_qcow2.parent / "manifest.json").read_text())
    assert manifest["recipe"] == debian.recipe_digest(debian.DEFAULT_MIRROR)
    assert manifest["size_bytes"] == debian_qcow2.stat().st_size
    started = time.monotonic()
    assert debian.build(debian_qcow2.parent) == debian_qcow2
    assert time.monotonic() - started < 5  # up to date: nothing rebuilt
    assert debian_qcow2.stat().st_size == manifest["size_bytes"]


def test_a_failed_build_leaves_no_loop_device_mount_or_partial_image(tmp_path: Path):
    out = tmp_path / "out"
    unreachable = "http://127.0.0.1:9/debian"  # the discard port: mmdebstrap fails at its first download
    with pytest.raises(debian.BuildError, match=r"mmdebstrap .* failed"):
        debian.build(out, unreachable)
    loops = subprocess.run(
        ["losetup", "--list", "--noheadings", "--output", "BACK-FILE"], capture_output=True, text=True
    )
    assert str(out) not in loops.stdout
    assert str(out) not in Path("/proc/mounts").read_text()
    assert sorted(path.name for path in out.iterdir()) == [".lock"]
    assert not debian.up_to_date(out, unreachable)


def test_the_recipe_digest_follows_the_mirror_and_the_settings(monkeypatch: pytest.MonkeyPatch):
    digest = debian.recipe_digest(debian.DEFAULT_MIRROR)
    assert debian.recipe_digest(debian.DEFAULT_MIRROR) == digest
    assert debian.recipe_digest("http://mirror.example/debian") != digest
    monkeypatch.setattr(debian, "PACKAGES", (*debian.PACKAGES, "vim"))
    assert debian.recipe_digest(debian.DEFAULT_MIRROR) != digest


def _ssh(client: Namespace, key: Path, address: str, *command: str) -> list[str]:
    return client.command(
        "ssh",
        "-i", str(key),
        "-o", "StrictHostKeyChecking=no",
        "-o", "UserKnownHostsFile=/dev/null",
        "-o", "BatchMode=yes",
        "-o", "ConnectTimeout=10",
        "-o", "ServerAliveInterval=5",
        "-o", "ServerAliveCountMax=24",
        "-o", "LogLevel=ERROR",
        f"debian@{address}",
        *command,
    )  # fmt: skip


def _serial_tail(cluster: Cluster, vm_id: str) -> str:
    node = VM.objects.select_related("node").get(pk=vm_id).node
    assert node is not None
    log = cluster.data_dirs[node.name] / "run" / vm_id / "serial.log"
    text = log.read_text(errors="replace") if log.exists() else "(no serial log)"
    return "\n".join(text.replace("\r", "").splitlines()[-40:])


class Stream:
    """One SSH session printing the guest's clock every 0.2 s; lines are kept with their arrival time."""

    def __init__(self, command: list[str]) -> None:
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append((time.monotonic(), line.strip()))

    def wait_lines(self, count: int, timeout: float, what: str) -> None:
        target = len(self.lines) + count
        wait_for(lambda: len(self.lines) >= target or self.process.poll() is not None, timeout, what)
        assert self.process.poll() is None, (
            f"the SSH session ended ({self.process.returncode}): {self.stderr()}"
        )

    def longest_gap(self, since: float) -> float:
        """The longest wait between two lines from the last one before ``since`` on."""
        before = [at for at, _ in self.lines if at < since][-1:]
        times = before + [at for at, _ in self.lines if at >= since]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)

    def stderr(self) -> str:
        if self.process.poll() is None:
            return ""
        assert self.process.stderr is not None
        return self.process.stderr.read()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


@pytest.mark.integration
@pytest.mark.qemu
@pytest.mark.netns
@pytest.mark.django_db(transaction=True)
def test_a_debian_guest_gets_its_seed_and_keeps_an_ssh_session_through_a_live_migration(
    cluster: Cluster, api: Any, staff_api: Any, debian_image: Image, lab: NetLab, tmp_path: Path
) -> None:
    node1, node2 = list(cluster.nodes)
    prefix = f"10.{100 + secrets.randbelow(50)}.{secrets.randbelow(256)}"
    response = staff_api.post(
        "/api/v1/networks/",
        {"name": "lan", "cidr": f"{prefix}.0/24", "shared": True, "physical_network": "lan"},
        format="json",
    )
    assert response.status_code == 201, response.json()
    client = lab.clients[0]
    client.run("ip", "addr", "add", f"{prefix}.250/24", "dev", "lan")
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "test", "-f", str(key)], check=True)
    hostname = f"deb-{secrets.token_hex(3)}"
    payload = {
        "name": "debian",
        "image": debian_image.name,
        "vcpus": 1,
        "memory_mb": 512,
        "disk_gb": 3,
        "node": node1,
        "networks": ["lan"],
        "hostname": hostname,
        "ssh_keys": [key.with_suffix(".pub").read_text().strip()],
    }
    response = api.post("/api/v1/vms/", payload, format="json")
    assert response.status_code == 202, response.json()
    vm = response.json()
    address = vm["nics"][0]["ipv4"]
    started = time.monotonic()
    wait_for(lambda: VM.objects.get(pk=vm["id"]).state == "running", 120, "the VM to run")

    def answers() -> bool:
        result = subprocess.run(
            _ssh(client, key, address, "hostname"), capture_output=True, text=True, timeout=60
        )
        return result.returncode == 0 and result.stdout.strip() == hostname

    try:
        wait_for(answers, BOOT_TIMEOUT, f"ssh debian@{address} to answer {hostname}", interval=5)
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}; the guest's serial console ends:\n{_serial_tail(cluster, vm['id'])}"
        ) from None
    booted = time.monotonic() - started
    # The default user has passwordless sudo; sshd offers no password logins.
    sudo = subprocess.run(
        _ssh(client, key, address, "sudo", "-n", "id", "-un"), capture_output=True, text=True
    )
    assert sudo.stdout.strip() == "root", (sudo.stdout, sudo.stderr)
    refused = subprocess.run(
        _ssh(client, tmp_path / "no-such-key", address, "true"), capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 255 and "Permission denied (publickey)." in refused.stderr, refused.stderr
    print(f"\nDebian guest: SSH answered its seeded hostname {booted:.0f} s after the create")

    stream = Stream(_ssh(client, key, address, "while sleep 0.2; do date +%s%N; done"))
    try:
        stream.wait_lines(10, 60, "the SSH session's first lines")
        response = api.post(
            f"/api/v1/vms/{vm['id']}/migrate/", {"dest_node": node2, "mode": "live"}, format="json"
        )
        assert response.status_code == 202, response.json()
        migration_id = response.json()["id"]
        switch_started = time.monotonic()
        wait_for(
            lambda: Migration.objects.get(pk=migration_id).status in ("completed", "failed", "cancelled"),
            MIGRATION_TIMEOUT,
            "the migration to end",
            interval=0.5,
        )
        migration = Migration.objects.get(pk=migration_id)
        assert migration.status == "completed", migration.error
        moved = VM.objects.select_related("node").get(pk=vm["id"]).node
        assert moved is not None and moved.name == node2
        stream.wait_lines(25, 60, "lines from the guest on its new node")
        gap = stream.longest_gap(switch_started)
        body = api.get(f"/api/v1/migrations/{migration_id}/").json()
        print(
            f"live migration {time.monotonic() - switch_started:.0f} s, guest pause {body['downtime_ms']} ms, "
            f"longest gap in the SSH stream {gap * 1000:.0f} ms, {len(stream.lines)} lines"
        )
        assert gap < 30, gap
        clock = [int(text) for _, text in stream.lines]  # the guest's clock, in ns, from one session
        assert clock == sorted(clock), clock
    finally:
        stream.close()
    result = subprocess.run(
        _ssh(client, key, address, "hostname"), capture_output=True, text=True, timeout=60
    )
    assert result.stdout.strip() == hostname, (result.stdout, result.stderr)
