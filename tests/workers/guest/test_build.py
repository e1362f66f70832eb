"""The builder's output: manifest, files, initramfs contents, and a fast second run."""

import gzip
import hashlib
import json
from pathlib import Path

import pytest

from tests.workers.guest.test_cpio_kernel import parse_newc
from workers.guest import build as build_module
from workers.guest.boot import GuestError
from workers.guest.build import build
from workers.guest.kernel import has_pvh_entry


def test_manifest_describes_the_files(guest_manifest: Path):
    manifest = json.loads(guest_manifest.read_text())
    assert manifest["format"] == 2
    assert manifest["name"] == "testguest"
    assert manifest["cmdline"].startswith("console=ttyS0")
    kernel, initrd = manifest["kernel"], manifest["initrd"]
    assert kernel["package"].startswith("linux-image-6.1.")
    assert kernel["version"].startswith("6.1.")
    for record in (kernel, initrd):
        data = (guest_manifest.parent / record["path"]).read_bytes()
        assert len(data) == record["size"]
        assert hashlib.sha256(data).hexdigest() == record["sha256"]
    if manifest["fallback"] is None:
        assert kernel["path"] == "vmlinux" and kernel["boot"] == "pvh"
        assert has_pvh_entry((guest_manifest.parent / "vmlinux").read_bytes())
    else:
        assert kernel["path"] == "vmlinuz" and kernel["boot"] == "bzimage"


def test_initramfs_holds_busybox_init_dhcp_script_and_disk_and_net_modules(guest_manifest: Path):
    manifest = json.loads(guest_manifest.read_text())
    members = {
        path: (mode, body, major, minor)
        for path, mode, body, major, minor in parse_newc(
            gzip.decompress((guest_manifest.parent / "initrd.img").read_bytes())
        )
    }
    assert members["init"][1].startswith(b"#!/bin/sh")
    assert members["init"][0] & 0o111
    assert members["bin/busybox"][1].startswith(b"\x7fELF")
    assert members["bin/sh"][1] == b"busybox"
    assert members["dev/console"][2:] == (5, 1)
    assert members["etc/udhcpc.script"][1].startswith(b"#!/bin/sh")
    assert members["etc/udhcpc.script"][0] & 0o111
    orders = {
        name: members[f"lib/modules/{name}.order"][1].decode().split()
        for name in manifest["initrd"]["modules"]
    }
    assert orders == manifest["initrd"]["modules"]
    assert orders["disk"][-1] == "virtio_blk" and orders["net"][-1] == "virtio_net"
    assert {"failover", "net_failover"} <= set(orders["net"])  # virtio_net's dependencies, before it
    assert orders["net"].index("virtio_pci") < orders["net"].index("virtio_net")
    assert all(f"lib/modules/{name}.ko" in members for order in orders.values() for name in order)


def test_a_change_to_a_guest_file_changes_the_builder_fingerprint(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    # The build reuses its output only while the fingerprint matches: editing init.sh or the DHCP
    # script must make the next build produce a new initramfs.
    for name in build_module.SOURCES:
        (tmp_path / name).write_bytes((build_module.PACKAGE_DIR / name).read_bytes())
    monkeypatch.setattr(build_module, "PACKAGE_DIR", tmp_path)
    fingerprints = {build_module.builder_fingerprint()}
    for name in ("init.sh", "udhcpc.sh"):
        with (tmp_path / name).open("a") as script:
            script.write("# edited\n")
        fingerprints.add(build_module.builder_fingerprint())
    assert len(fingerprints) == 3


def test_second_build_reuses_the_output(guest_manifest: Path):
    files = [guest_manifest.parent / name for name in ("manifest.json", "initrd.img")]
    before = [path.stat().st_mtime_ns for path in files]
    assert build(boot_check=False, log=lambda message: None) == guest_manifest
    assert [path.stat().st_mtime_ns for path in files] == before


def test_falls_back_to_vmlinuz_when_pvh_boot_fails(
    guest_manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # The boot check is replaced here (a real TCG boot of both kernels would take ~10 s more); the real
    # check runs in `python -m workers.guest.build` and the guests booted in test_guest_*.py.
    checked: list[str] = []

    def boot_check(out: Path, kernel_name: str, log: object) -> float:
        checked.append(kernel_name)
        if kernel_name == "vmlinux":
            raise GuestError("no line matching 'tick' within 90 s")
        return 7.5

    monkeypatch.setattr(build_module, "check_boot", boot_check)
    manifest_path = build(out=tmp_path, boot_check=True, log=lambda message: None)
    manifest = json.loads(manifest_path.read_text())
    assert checked == ["vmlinux", "vmlinuz"]
    assert manifest["kernel"]["path"] == "vmlinuz" and manifest["kernel"]["boot"] == "bzimage"
    assert "PVH boot of the uncompressed vmlinux failed" in manifest["fallback"]
    assert manifest["boot_check"]["first_tick_seconds"] == 7.5
    assert not (tmp_path / "vmlinux").exists()
    assert (tmp_path / "vmlinuz").read_bytes()[0x202:0x206] == b"HdrS"  # bzImage setup header
