"""The Debian 12 cloud image for guest tests: built by the same code as ``make image-debian`` when it is
missing or its recipe changed, and registered as a path image; plus the network cluster of tests/networks
(node workers in namespaces, a client on the provider LAN ``lan`` both nodes join)."""

import json
import subprocess
import time
from pathlib import Path

import pytest

from apps.vms.models import Image
from tests.networks.conftest import cluster_hosts, cluster_redis_url, lab  # noqa: F401 - fixtures
from tests.workers.node.conftest import (  # noqa: F401 - fixtures
    cluster,
    cluster_extra_env,
    guest_image,
    test_guest,
)
from workers.guest import debian


@pytest.fixture(scope="session")
def debian_qcow2() -> Path:
    """The built image (``var/images/debian-12/debian-12.qcow2``); a build takes minutes (see docs)."""
    started = time.monotonic()
    fresh = not debian.up_to_date(debian.DEFAULT_OUT)
    image = debian.build(debian.DEFAULT_OUT)
    if fresh:
        size = image.stat().st_size / 1024**2
        print(f"\nbuilt {image}: {size:.1f} MiB in {time.monotonic() - started:.0f} s")
    return image


@pytest.fixture
def debian_image(debian_qcow2: Path, transactional_db: None) -> Image:
    """The image registered by path (a stored image once ``image_import`` is in the tree)."""
    info = subprocess.run(
        ["qemu-img", "info", "--output=json", str(debian_qcow2)], check=True, capture_output=True, text=True
    )
    return Image.objects.create(
        name="debian-12",
        path=str(debian_qcow2),
        format="qcow2",
        os_type="linux",
        os_version="12",
        size_bytes=debian_qcow2.stat().st_size,
        virtual_size_bytes=json.loads(info.stdout)["virtual-size"],
        min_memory_mb=256,
    )
