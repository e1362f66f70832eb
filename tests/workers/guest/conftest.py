"""Fixtures: the test guest built once per session (reusing an up-to-date build in var/images/testguest)."""

import shutil
from pathlib import Path

import pytest

from workers.guest.boot import QEMU, GuestImage
from workers.guest.build import build


@pytest.fixture(scope="session")
def guest_manifest() -> Path:
    missing = [tool for tool in ("apt-get", "apt-cache", "dpkg-deb") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"building the test guest needs {', '.join(missing)}")
    return build(boot_check=False, log=lambda message: None)


@pytest.fixture(scope="session")
def guest_image(guest_manifest: Path) -> GuestImage:
    if shutil.which(QEMU) is None:
        pytest.skip(f"{QEMU} is not installed")
    return GuestImage.from_manifest(guest_manifest)
