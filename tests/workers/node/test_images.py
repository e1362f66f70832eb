"""The node's image cache with real files and real qemu-img: verify, adopt, LRU, in-use protection,
rebase, and the listing a node reports (read off the control queue of the test Redis)."""

import base64
import hashlib
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import redis
from celery import Celery
from django.conf import settings

from workers import contract
from workers.node.images import ImageCache, ImageMissing, ImageRefused, qcow2_backing_file
from workers.node.reports import Reporter

MIB = 1 << 20


def _image(directory: Path, fill: int, size_mib: int = 1) -> tuple[str, bytes]:
    data = bytes([fill]) * (size_mib * MIB)
    sha256 = hashlib.sha256(data).hexdigest()
    (directory / sha256).write_bytes(data)
    return sha256, data


@pytest.fixture
def cache(tmp_path: Path) -> ImageCache:
    return ImageCache(tmp_path / "data", limit_bytes=2 * MIB)


def _cached(cache: ImageCache, fill: int, *, used_at: float, used: bool = True) -> str:
    """An adopted image, last used at ``used_at``; ``used=False``: what it was fetched for has not
    used it yet."""
    sha256, _ = _image(cache.incoming, fill)
    cache.adopt(sha256, MIB)
    if used:
        cache.unpin(sha256)
    os.utime(cache.path(sha256), (used_at, used_at))
    return sha256


def _vm(sha256: str) -> contract.VmDescription:
    return {
        "id": str(uuid.uuid4()),
        "name": "web-1",
        "vcpus": 1,
        "memory_mb": 64,
        "disk_gb": 1,
        "image": {"kind": "disk", "name": "debian-12", "format": "qcow2", "path": "", "sha256": sha256},
    }


def _record_vm(cache: ImageCache, sha256: str) -> None:
    """A VM of this node backed by the image, as the driver records it (its run dir's spec)."""
    vm = cache.resolve(_vm(sha256))
    run_dir = cache.data_dir / "run" / vm["id"]
    run_dir.mkdir(parents=True)
    (run_dir / "spec.json").write_text(json.dumps(vm))


def test_a_received_image_is_adopted_only_with_its_sha256(cache: ImageCache):
    sha256, data = _image(cache.incoming, 0x5A)
    path = cache.adopt(sha256, len(data))
    assert path == cache.root / sha256 and path.read_bytes() == data
    assert not (cache.incoming / sha256).exists()
    assert cache.adopt(sha256, len(data)) == path  # a repeated adopt

    wrong = "0" * 64
    (cache.incoming / wrong).write_bytes(b"not that image")
    with pytest.raises(ImageRefused, match="arrived with sha256"):
        cache.adopt(wrong, 14)
    assert not (cache.incoming / wrong).exists() and not cache.path(wrong).exists()
    with pytest.raises(ImageRefused, match="nothing was received"):
        cache.adopt("1" * 64, 1)


def test_a_size_other_than_the_catalogs_is_refused(cache: ImageCache):
    sha256, data = _image(cache.incoming, 0x11)
    with pytest.raises(ImageRefused, match="expected"):
        cache.adopt(sha256, len(data) + 1)


def test_a_vm_of_a_stored_image_gets_the_cache_path_and_waits_for_the_file(cache: ImageCache):
    sha256 = "a" * 64
    vm = cache.resolve(_vm(sha256))
    assert vm["image"]["path"] == str(cache.root / sha256)
    with pytest.raises(ImageMissing), cache.holding(vm):
        pass
    assert cache.resolve(_vm("../../etc/passwd"))["image"]["path"] == ""
    legacy = _vm("")
    legacy["image"]["path"] = "/srv/images/legacy.qcow2"
    assert cache.resolve(legacy) == legacy


def test_eviction_removes_the_least_recently_used_image_no_vm_uses(cache: ImageCache):
    oldest = _cached(cache, 1, used_at=1000)
    used = _cached(cache, 2, used_at=500)  # older still, but a VM here is backed by it
    newest = _cached(cache, 3, used_at=3000)
    _record_vm(cache, used)
    evicted, over = cache.evict()
    assert evicted == [oldest] and over == ""
    assert sorted(image["sha256"] for image in cache.listing()) == sorted([used, newest])


def test_a_use_moves_an_image_up_the_order(cache: ImageCache):
    first = _cached(cache, 1, used_at=1000)
    second = _cached(cache, 2, used_at=2000)
    third = _cached(cache, 3, used_at=3000)
    with cache.holding(cache.resolve(_vm(first))):  # a create on it
        pass
    assert cache.evict()[0] == [second]
    assert {image["sha256"] for image in cache.listing()} == {first, third}


def test_an_image_fetched_for_vms_that_did_not_use_it_yet_is_kept(cache: ImageCache):
    waiting = _cached(cache, 1, used_at=1000, used=False)  # the oldest, but its VMs are still to come
    second = _cached(cache, 2, used_at=2000)
    _cached(cache, 3, used_at=3000)
    assert cache.evict()[0] == [second]
    with cache.holding(cache.resolve(_vm(waiting))):  # its VM's disk is made: the pin goes
        pass
    os.utime(cache.path(waiting), (1000, 1000))
    _cached(cache, 4, used_at=4000)
    assert cache.evict()[0] == [waiting]


def test_images_in_use_stay_even_over_the_limit(cache: ImageCache, tmp_path: Path):
    images = [_cached(cache, fill, used_at=1000 + fill) for fill in (1, 2, 3)]
    _record_vm(cache, images[0])
    # The others back disks: a VM's overlay and a cold migration's incoming copy, whose header still
    # names the source node's cache.
    disks = cache.data_dir / "disks"
    disks.mkdir()
    for index, sha256 in enumerate(images[1:]):
        base = tmp_path / "elsewhere" / "images" / sha256
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", str(base), "-F", "raw", "-o",
             "size=1M", str(disks / f"{index}.qcow2")],
            check=True,
        )  # fmt: skip
    evicted, over = cache.evict()
    assert evicted == []
    assert over.startswith("image cache holds 3145728 bytes, over its limit of 2097152")
    assert all(image["in_use"] for image in cache.listing())


def test_a_received_overlay_is_rebased_onto_this_nodes_cache(cache: ImageCache, tmp_path: Path):
    sha256 = _cached(cache, 7, used_at=1000)
    disk = tmp_path / "disk.qcow2"
    source_base = tmp_path / "source-node" / "images" / sha256
    source_base.parent.mkdir(parents=True)
    (source_base).write_bytes(cache.path(sha256).read_bytes())
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(source_base), "-F", "raw", str(disk)],
        check=True,
    )
    subprocess.run(["qemu-io", "-c", "write -P 0x33 0 64k", str(disk)], check=True, capture_output=True)
    vm = cache.resolve(_vm(sha256))
    vm["image"]["format"] = "raw"
    cache.rebase(Path(shutil.which("qemu-img") or "qemu-img"), disk, vm)
    assert qcow2_backing_file(disk) == str(cache.path(sha256))
    source_base.unlink()  # the overlay no longer needs the other node's file
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", "--backing-chain", str(disk)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    assert info[0]["backing-filename"] == str(cache.path(sha256))
    assert info[1]["format"] == "raw"
    read = subprocess.run(
        ["qemu-io", "-c", "read -P 0x33 0 64k", "-c", "read -P 0x07 64k 64k", str(disk)],
        check=True,
        capture_output=True,
        text=True,
    )
    assert "Pattern verification failed" not in read.stdout


def test_the_listing_reaches_the_control_queue(cache: ImageCache):
    used = _cached(cache, 1, used_at=1000)
    free = _cached(cache, 2, used_at=2000)
    _record_vm(cache, used)
    client = redis.Redis.from_url(settings.REDIS_URL)
    client.delete(contract.CONTROL_QUEUE)
    app = Celery("node-images-test", broker=settings.REDIS_URL)
    app.conf.update(task_serializer="json")
    Reporter(app, "n1").images(cache.listing(), over_limit="")
    (raw,) = client.lrange(contract.CONTROL_QUEUE, 0, -1)
    message = json.loads(raw)
    assert message["headers"]["task"] == contract.CONTROL_NODE_IMAGES
    kwargs = json.loads(base64.b64decode(message["body"]))[1]
    assert kwargs["node"] == "n1" and kwargs["over_limit"] == ""
    assert {(image["sha256"], image["in_use"], image["size_bytes"]) for image in kwargs["images"]} == {
        (used, True, MIB),
        (free, False, MIB),
    }
    client.delete(contract.CONTROL_QUEUE)
