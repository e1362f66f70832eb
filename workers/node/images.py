"""The node's image cache: stored disk images by sha256 under DATA/images, verified, LRU-evicted.

A VM of a stored image boots from an overlay on DATA/images/<sha256>; its description carries only the
digest and this module fills in the path (``resolve``), so no path from a user reaches QEMU. A pushed
image lands in DATA/images/incoming/<sha256> (DWCP verified its own chunk digests) and is adopted
only once its sha256 matches, by an atomic rename. Order of use is the file's mtime (touched at every
create, start and migration). Invariants: an image a VM of this node is backed by (a run dir's spec, a
disk's or an incoming disk's qcow2 backing file) is never evicted, nor one adopted for VMs or a
migration that have not used it yet (pinned in memory, for at most PIN_SECONDS); creates and evictions
hold one lock, so an image cannot go between a create's check and its overlay; when everything is in
use the cache stays over its limit and says so.
"""

import hashlib
import json
import logging
import os
import re
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from workers import contract

logger = logging.getLogger(__name__)

_SHA256 = re.compile(r"[0-9a-f]{64}")
_QCOW2_MAGIC = b"QFI\xfb"
_QCOW2_BACKING = struct.Struct(">QI")  # backing_file_offset, backing_file_size at byte 8
_READ_SIZE = 4 << 20
PIN_SECONDS = 3600.0  # how long an adopted image nobody used yet is kept from eviction


class ImageMissing(Exception):
    """A VM needs a stored image this node does not hold."""

    def __init__(self, sha256: str) -> None:
        super().__init__(f"image {sha256} is not in this node's cache")
        self.sha256 = sha256


class ImageRefused(Exception):
    """A received image failed its check (wrong sha256 or size), or was not received."""


def valid_sha256(sha256: str) -> bool:
    return bool(_SHA256.fullmatch(sha256))


class ImageCache:
    """The images of one node's data dir, with a size limit in bytes."""

    def __init__(self, data_dir: Path, limit_bytes: int) -> None:
        self.data_dir = data_dir
        self.root = data_dir / contract.IMAGE_CACHE_DIR
        self.incoming = data_dir / contract.IMAGE_INCOMING_DIR
        self.limit_bytes = limit_bytes
        self.lock = threading.RLock()
        self._pins: dict[str, float] = {}  # adopted, not used yet: sha256 -> monotonic expiry
        self.incoming.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        if not valid_sha256(sha256):
            raise ValueError(f"not a sha256 in lowercase hex: {sha256!r}")
        return self.root / sha256

    def resolve(self, vm: contract.VmDescription) -> contract.VmDescription:
        """``vm`` with its stored image's base path set to this cache's file (present or not)."""
        image = vm.get("image", {})
        sha256 = str(image.get("sha256") or "")
        if not valid_sha256(sha256) or image.get("path"):
            return vm  # an invalid digest leaves no path: the spec is refused as it stands
        return {**vm, "image": {**image, "path": str(self.path(sha256))}}

    @contextmanager
    def holding(self, vm: contract.VmDescription) -> Iterator[None]:
        """Hold the cache's lock while ``vm``'s disk is made on its image: ImageMissing if it is absent."""
        sha256 = str(vm.get("image", {}).get("sha256") or "")
        with self.lock:
            if sha256:
                path = self.path(sha256)
                if not path.is_file():
                    raise ImageMissing(sha256)
                self.touch(sha256)
            yield
            self.unpin(sha256)  # the new disk's header names it from now on

    def unpin(self, sha256: str) -> None:
        """What the image was fetched for uses it now (its VMs' disks protect it from here on)."""
        with self.lock:
            self._pins.pop(sha256, None)

    def touch_vm(self, vm: contract.VmDescription) -> None:
        """Record a use of ``vm``'s stored image, if it has one."""
        sha256 = str(vm.get("image", {}).get("sha256") or "")
        if sha256:
            self.touch(sha256)

    def touch(self, sha256: str) -> None:
        """Record a use of the image (its mtime orders the LRU)."""
        with suppress(FileNotFoundError, ValueError):
            os.utime(self.path(sha256))

    def adopt(self, sha256: str, size_bytes: int) -> Path:
        """Verify the received file and move it into the cache; ImageRefused (file removed) if it is wrong."""
        received = self.incoming / sha256
        if not valid_sha256(sha256):
            raise ImageRefused(f"not a sha256: {sha256!r}")
        with self.lock:
            target = self.path(sha256)
            if target.is_file() and not received.exists():
                return target  # a repeated adopt of an image already here
            if not received.is_file():
                raise ImageRefused(f"nothing was received for image {sha256}")
            actual_size = received.stat().st_size
            digest = file_sha256(received)
            if digest != sha256 or (size_bytes and actual_size != size_bytes):
                received.unlink(missing_ok=True)
                raise ImageRefused(
                    f"image {sha256} arrived with sha256 {digest} and {actual_size} bytes "
                    f"(expected {size_bytes}): discarded"
                )
            received.chmod(0o644)
            os.replace(received, target)
            self.touch(sha256)
            self._pins[sha256] = time.monotonic() + PIN_SECONDS
        logger.info("image %s adopted into the cache (%d bytes)", sha256, actual_size)
        return target

    def in_use(self) -> set[str]:
        """Digests of cached images that a VM or a migration's copy on this node is backed by."""
        used: set[str] = set()
        for spec in self.data_dir.glob("run/*/spec.json"):
            try:
                path = Path(json.loads(spec.read_text())["image"].get("path", ""))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue
            if path.parent == self.root:
                used.add(path.name)
        for disk in (self.data_dir / "disks").glob("*"):
            backing = qcow2_backing_file(disk)
            if backing and valid_sha256(Path(backing).name):
                used.add(Path(backing).name)  # an incoming cold copy still names the source's cache
        return used

    def listing(self) -> list[contract.CachedImage]:
        used = self.in_use()
        images: list[contract.CachedImage] = []
        for path in self.root.iterdir() if self.root.is_dir() else ():
            if not path.is_file() or not valid_sha256(path.name):
                continue
            stat = path.stat()
            images.append(
                {
                    "sha256": path.name,
                    "size_bytes": stat.st_size,
                    "last_used": stat.st_mtime,
                    "in_use": path.name in used,
                }
            )
        return images

    def evict(self) -> tuple[list[str], str]:
        """Remove least recently used images no VM uses until the cache fits its limit.

        Returns the evicted digests and "" or why the cache stays over its limit.
        """
        evicted: list[str] = []
        with self.lock:
            now = time.monotonic()
            self._pins = {sha256: until for sha256, until in self._pins.items() if until > now}
            images = sorted(self.listing(), key=lambda image: image["last_used"])
            total = sum(image["size_bytes"] for image in images)
            for image in images:
                if total <= self.limit_bytes:
                    break
                if image["in_use"] or image["sha256"] in self._pins:
                    continue
                self.path(image["sha256"]).unlink(missing_ok=True)
                total -= image["size_bytes"]
                evicted.append(image["sha256"])
                logger.info("image %s evicted from the cache", image["sha256"])
        over = ""
        if total > self.limit_bytes:
            over = (
                f"image cache holds {total} bytes, over its limit of {self.limit_bytes}: "
                "every remaining image is in use by a VM or fetched for one that has not started yet"
            )
            logger.warning("%s", over)
        return evicted, over

    def rebase(self, qemu_img: Path, disk: Path, vm: contract.VmDescription) -> None:
        """Point a received overlay's backing file at this node's own cache file (a cold migration:
        its header still names the source's)."""
        image = vm.get("image", {})
        sha256 = str(image.get("sha256") or "")
        if not sha256 or not disk.is_file():
            return
        base = self.path(sha256)
        if not base.is_file():
            raise ImageMissing(sha256)
        if qcow2_backing_file(disk) == str(base):
            return
        fmt = str(image.get("format") or "qcow2")
        result = subprocess.run(
            [str(qemu_img), "rebase", "-u", "-F", fmt, "-b", str(base), str(disk)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            raise ImageRefused(f"qemu-img rebase of {disk.name} failed: {result.stderr.strip()[:300]}")
        self.touch(sha256)


def file_sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(_READ_SIZE):
            hasher.update(chunk)
    return hasher.hexdigest()


def qcow2_backing_file(path: Path) -> str:
    """The backing file a qcow2's header names ("" for none, another format or an unreadable file)."""
    try:
        with path.open("rb") as stream:
            header = stream.read(8 + _QCOW2_BACKING.size)
            if len(header) < 8 + _QCOW2_BACKING.size or header[:4] != _QCOW2_MAGIC:
                return ""
            offset, size = _QCOW2_BACKING.unpack_from(header, 8)
            if not offset or not 0 < size <= 1023:
                return ""
            stream.seek(offset)
            return stream.read(size).decode(errors="replace")
    except OSError:
        return ""
