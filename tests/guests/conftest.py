"""The Debian 12 cloud image for guest tests: built by the same code as ``make image-debian`` when it is
missing or its recipe changed, and imported into the store (nodes fetch it by DWCP); plus the network
cluster of tests/networks (node workers in namespaces, a client on the provider LAN ``lan`` both nodes
join) with the store shared by the control worker."""

import io
import time
from pathlib import Path

import pytest
from django.core.management import call_command

from apps.vms.models import Image
from tests.images.conftest import cluster_extra_env, store_dir  # noqa: F401 - fixtures
from tests.networks.conftest import cluster_hosts, cluster_redis_url, lab  # noqa: F401 - fixtures
from tests.workers.node.conftest import (  # noqa: F401 - fixtures
    cluster,
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
def debian_image(debian_qcow2: Path, store_dir: Path, transactional_db: None) -> Image:  # noqa: F811 - the fixture
    """The image imported into the store as an operator would (``manage.py image_import``): VMs of it
    fetch it to their node by DWCP."""
    out = io.StringIO()
    call_command(
        "image_import",
        "debian-12",
        str(debian_qcow2),
        format="qcow2",
        visibility="shared",
        os_type="linux",
        os_version="12",
        min_memory_mb=256,
        stdout=out,
    )
    image = Image.objects.get(name="debian-12")
    assert image.sha256 and not image.path, out.getvalue()
    return image
