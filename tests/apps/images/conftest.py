"""Image files made by the real ``qemu-img`` in a test's directory, and a store of the test's own."""

import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

from apps.images.store import LOCKS_DIR


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The image store of this test (empty)."""
    directory = tmp_path / "store"
    monkeypatch.setitem(settings.NOVACRON, "IMAGE_STORE_DIR", str(directory))
    return directory


def stored_files(store: Path) -> list[str]:
    """Every file under the store, partial ones included (relative paths); not the empty lock files."""
    found = (path.relative_to(store) for path in store.rglob("*") if path.is_file())
    return sorted(str(path) for path in found if path.parts[0] != LOCKS_DIR)


# qemu-img times its PBKDF to size a LUKS key slot and gives up when the CPU is busy elsewhere
# ("Unable to get accurate CPU usage": 8 of 15 creations beside 4 busy loops here; once in CI).
BUSY_CPU = "Unable to get accurate CPU usage"


def qemu_img(*args: str) -> None:
    """``qemu-img ARGS``; its message in the error when it fails (a creation beaten by a busy CPU is
    tried again, up to 10 times)."""
    for _ in range(10):
        result = subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=60)
        if result.returncode == 0 or BUSY_CPU not in result.stderr:
            break
    if result.returncode != 0:
        raise AssertionError(f"qemu-img {' '.join(args)} failed: {result.stderr.strip()}")


@pytest.fixture
def disks(tmp_path: Path) -> Callable[..., Path]:
    """``disks(kind, name=..., size=..., options=...)``: a file made by qemu-img (``qcow2``, ``raw``
    with random content, ``backing``: a qcow2 over /etc/passwd, ``data_file``: a qcow2 with an
    external data file) or ``text`` (not an image)."""
    made = tmp_path / "disks"
    made.mkdir()

    def make(kind: str, *, name: str = "", size: str = "1M", **extra: Any) -> Path:
        path = made / (name or f"{kind}-{len(list(made.iterdir()))}")
        if kind == "qcow2":
            qemu_img("create", "-q", "-f", "qcow2", str(path), size)
        elif kind == "raw":
            path.write_bytes(os.urandom(int(extra.get("bytes", 1 << 20))))
        elif kind == "backing":
            qemu_img("create", "-q", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw", str(path))
        elif kind == "data_file":
            qemu_img(
                "create", "-q", "-f", "qcow2", "-o", f"data_file={made / 'external.raw'}", str(path), size
            )
        elif kind == "text":
            path.write_text("#!/bin/sh\necho this is not a disk image\n")
        else:
            raise ValueError(kind)
        return path

    return make
