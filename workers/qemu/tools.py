"""The QEMU programs the driver runs: locating them, their version, and `qemu-img` calls.

A missing program raises `QemuNotInstalled` naming the Debian package that provides it, so the message
on a fresh node says what to install.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers.qemu.errors import QemuImgError, QemuNotInstalled

DEBIAN_PACKAGES = {"qemu-system-x86_64": "qemu-system-x86", "qemu-img": "qemu-utils"}
VERSION_PATTERN = re.compile(r"version (\d+\.\d+(?:\.\d+)?)")
QEMU_IMG_TIMEOUT = 60.0  # creating an overlay or reading info is metadata-only; a minute means it hangs


@dataclass(frozen=True)
class QemuTools:
    """Absolute paths of `qemu-system-x86_64` and `qemu-img`."""

    system: Path
    img: Path

    @classmethod
    def locate(cls, system: str = "qemu-system-x86_64", img: str = "qemu-img") -> QemuTools:
        """Find both programs (names are looked up in PATH); raise `QemuNotInstalled` if one is missing."""
        return cls(system=_which(system, "qemu-system-x86_64"), img=_which(img, "qemu-img"))

    def version(self) -> str:
        """The QEMU version, e.g. ``7.2.22``, from ``qemu-system-x86_64 --version``."""
        result = subprocess.run(
            [str(self.system), "--version"], capture_output=True, text=True, timeout=10, check=False
        )
        match = VERSION_PATTERN.search(result.stdout)
        if result.returncode != 0 or match is None:
            raise QemuNotInstalled(
                f"{self.system} --version did not report a version (exit {result.returncode}): "
                f"{(result.stderr or result.stdout).strip()[:300]}; reinstall the package qemu-system-x86"
            )
        return match.group(1)

    def img_create_overlay(self, target: Path, base: Path, base_format: str) -> None:
        """Create a qcow2 at ``target`` backed by ``base`` (its virtual size is the base's)."""
        self._img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", base_format, str(target))

    def img_create_empty(self, target: Path, size_gb: int) -> None:
        """Create an empty qcow2 of ``size_gb`` GiB at ``target``."""
        self._img("create", "-q", "-f", "qcow2", str(target), f"{size_gb}G")

    def img_info(self, path: Path) -> dict[str, Any]:
        """``qemu-img info --output=json`` of ``path`` (``-U``: readable while a QEMU holds it)."""
        output = self._img("info", "-U", "--output=json", str(path))
        info = json.loads(output)
        if not isinstance(info, dict):
            raise QemuImgError(f"qemu-img info {path} returned {output[:200]!r}, not a JSON object")
        return info

    def _img(self, *args: str) -> str:
        try:
            result = subprocess.run(
                [str(self.img), *args], capture_output=True, text=True, timeout=QEMU_IMG_TIMEOUT, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise QemuImgError(f"qemu-img {args[0]} did not finish in {QEMU_IMG_TIMEOUT:.0f} s") from exc
        if result.returncode != 0:
            raise QemuImgError(f"qemu-img {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout


def _which(name: str, canonical: str) -> Path:
    found = shutil.which(name)
    if found is None:
        package = DEBIAN_PACKAGES[canonical]
        raise QemuNotInstalled(
            f"{name} was not found in PATH; install it with `apt-get install {package}` "
            f"(Debian package {package})"
        )
    return Path(found).resolve()
