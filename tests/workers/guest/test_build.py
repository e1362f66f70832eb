"""The builder's output: manifest, files, initramfs contents, and a fast second run."""

import gzip
import hashlib
import json
import time
from pathlib import Path

from tests.workers.guest.test_cpio_kernel import parse_newc
from workers.guest.build import build
from workers.guest.kernel import has_pvh_entry


def test_manifest_describes_the_files(guest_manifest: Path):
    manifest = json.loads(guest_manifest.read_text())
    assert manifest["format"] == 1
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


def test_initramfs_holds_busybox_init_and_disk_modules(guest_manifest: Path):
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
    order = members["lib/modules/load-order"][1].decode().split()
    assert order == manifest["initrd"]["modules"]
    assert order[-1] == "virtio_blk"
    assert all(f"lib/modules/{name}.ko" in members for name in order)


def test_second_build_reuses_the_output(guest_manifest: Path):
    files = [guest_manifest.parent / name for name in ("manifest.json", "initrd.img")]
    before = [path.stat().st_mtime_ns for path in files]
    started = time.monotonic()
    assert build(boot_check=False, log=lambda message: None) == guest_manifest
    assert time.monotonic() - started < 15
    assert [path.stat().st_mtime_ns for path in files] == before
