"""Three node workers in their own network namespaces, a control worker and the image store: stored
images travel between real processes by DWCP. The first node's cache is small (two test images), for
the eviction test; the control worker and the test share the store directory."""

import hashlib
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from apps.images.store import store_path
from apps.vms.models import Image
from tests.netlab import NetLab, netlab
from tests.networks.conftest import cluster_redis_url  # noqa: F401 - fixture (a private Redis on the lab)
from tests.workers.node.conftest import (  # noqa: F401 - fixtures
    NodeHost,
    cluster,
    guest_image,
    test_guest,
)

# A test image is a qcow2 of 64 MiB holding 8 MiB of random data: about 8.4 MB on disk.
CACHE_GB = 0.018  # about 19.3 MB: two test images fit, a third makes the cache evict


@pytest.fixture
def lab() -> Iterator[NetLab]:
    with netlab(3) as lab:
        yield lab


@pytest.fixture
def store_dir(tmp_path: Path, settings) -> Path:
    directory = tmp_path / "store"
    directory.mkdir()
    settings.NOVACRON = {**settings.NOVACRON, "IMAGE_STORE_DIR": str(directory)}
    return directory


@pytest.fixture
def cluster_extra_env(store_dir: Path) -> dict[str, str]:
    return {"IMAGE_STORE_DIR": str(store_dir), "CPU_ALLOCATION_RATIO": "16"}


@pytest.fixture
def cluster_hosts(lab: NetLab) -> tuple[NodeHost, ...]:
    first, *others = lab.hosts
    return (
        NodeHost(first.netns, first.address, ("--image-cache-gb", str(CACHE_GB))),
        *(NodeHost(host.netns, host.address) for host in others),
    )


@pytest.fixture
def make_stored_image(store_dir: Path, tmp_path: Path) -> Callable[[str], Image]:
    """A disk image in the store as the import would leave it: a real qcow2 named by its sha256."""

    def make(name: str) -> Image:
        raw = tmp_path / f"{name}.raw"
        raw.write_bytes(secrets.token_bytes(8 << 20))
        qcow2 = tmp_path / f"{name}.qcow2"
        subprocess.run(["qemu-img", "convert", "-q", "-O", "qcow2", str(raw), str(qcow2)], check=True)
        subprocess.run(["qemu-img", "resize", "-q", str(qcow2), "64M"], check=True)
        data = qcow2.read_bytes()
        sha256 = hashlib.sha256(data).hexdigest()
        assert store_path(sha256).parent == store_dir
        shutil.copyfile(qcow2, store_path(sha256))
        return Image.objects.create(
            name=name, kind="disk", format="qcow2", path="", sha256=sha256, size_bytes=len(data)
        )

    return make
