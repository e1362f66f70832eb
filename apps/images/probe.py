"""What the store accepts: a file is an image of its declared format and nothing more.

A file is refused (:class:`ImageRefused`, a 400) when its sha256 is not the one the uploader expected,
when its first bytes name another format than the declared one (a "raw" that is really a qcow2 is the
classic read of a host file: QEMU would follow the qcow2's backing file on the node), when it is a
qcow2 that points outside itself (a backing file, an external data file) or is encrypted, when
``qemu-img info`` cannot read it or detects another format, or when its virtual size is above
``IMAGE_MAX_VIRTUAL_SIZE_GB``. The header checks run before ``qemu-img`` sees the file, so qemu-img
never opens a file a hostile image names; ``qemu-img info`` runs without ``-f`` so that it detects
the format itself.
"""

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from rest_framework import status

from apps.core.conf import novacron_setting
from apps.core.errors import NovaCronError
from apps.vms.choices import ImageFormat
from workers.qemu.errors import QemuImgError, QemuNotInstalled
from workers.qemu.tools import QemuTools

from .store import file_sha256

GIB: Final = 1024**3
SECTOR: Final = 512
QCOW_MAGIC: Final = b"QFI\xfb"
QCOW2_EXTERNAL_DATA_FILE: Final = 1 << 2  # incompatible feature bit
# First bytes of the formats qemu-img detects (block/*.c probes), so a file is named before qemu-img
# opens it; several of them can reference other files (vmdk extents, qed and vhdx parents).
MAGICS: Final = (
    (0, QCOW_MAGIC, "qcow2"),
    (0, b"QED\x00", "qed"),
    (0, b"KDMV", "vmdk"),
    (0, b"COWD", "vmdk"),
    (0, b"# Disk DescriptorFile", "vmdk"),
    (0, b"vhdxfile", "vhdx"),
    (0, b"conectix", "vpc"),
    (0, b"<<< Oracle VM VirtualBox Disk Image >>>", "vdi"),
    (0, b"LUKS\xba\xbe", "luks"),
    (0, b"WithoutFreeSpace", "parallels"),
    (0, b"WithouFreSpacExt", "parallels"),
    (0, b"Bochs Virtual HD Image", "bochs"),
    (0, b"#!/bin/sh\n#V2.0 Format", "cloop"),
)
HEAD_BYTES: Final = 512


class ImageRefused(NovaCronError):
    """The file is not an image the store keeps; the message says why."""

    code = "image_refused"
    status = status.HTTP_400_BAD_REQUEST


@dataclass(frozen=True)
class Verified:
    sha256: str
    size_bytes: int
    virtual_size_bytes: int


def sniffed_format(head: bytes) -> str | None:
    """The format the first bytes of a file name, or None (raw: any bytes are a raw disk)."""
    for offset, magic, name in MAGICS:
        if head[offset : offset + len(magic)] == magic:
            return "qcow" if name == "qcow2" and head[4:8] == b"\x00\x00\x00\x01" else name
    return None


def qcow2_header_refusal(head: bytes) -> str | None:
    """Why a qcow2 header is refused (a backing file, encryption, an external data file), or None."""
    if len(head) < 72:
        return "The qcow2 header is truncated."
    version, backing_offset = struct.unpack_from(">IQ", head, 4)
    (crypt_method,) = struct.unpack_from(">I", head, 32)
    if backing_offset:
        return "A qcow2 with a backing file is refused: upload a standalone image (qemu-img convert)."
    if crypt_method:
        return "An encrypted qcow2 is refused: upload an unencrypted image."
    if version >= 3 and len(head) >= 80:
        (incompatible,) = struct.unpack_from(">Q", head, 72)
        if incompatible & QCOW2_EXTERNAL_DATA_FILE:
            return "A qcow2 with an external data file is refused: upload a standalone image."
    return None


def info_refusal(info: dict[str, Any], declared: str) -> str | None:
    """Why ``qemu-img info``'s answer about a file declared ``declared`` is refused, or None."""
    detected = info.get("format")
    if detected != declared:
        return f"The file is {detected}, not {declared} as declared."
    if info.get("backing-filename") or info.get("full-backing-filename"):
        return "A qcow2 with a backing file is refused: upload a standalone image (qemu-img convert)."
    specific = (info.get("format-specific") or {}).get("data") or {}
    if specific.get("data-file"):
        return "A qcow2 with an external data file is refused: upload a standalone image."
    if info.get("encrypted") or specific.get("encrypt"):
        return "An encrypted qcow2 is refused: upload an unencrypted image."
    if specific.get("corrupt"):
        return "The qcow2 is marked corrupt: repair it (qemu-img check -r all) and upload it again."
    limit_gb = int(novacron_setting("IMAGE_MAX_VIRTUAL_SIZE_GB"))
    virtual = int(info.get("virtual-size") or 0)
    if virtual > limit_gb * GIB:
        return f"Its virtual size, {virtual} bytes, is above the limit of {limit_gb} GiB."
    return None


def verify(path: Path, *, declared: str, expected_sha256: str = "", sha256: str = "") -> Verified:
    """Check the file at ``path`` (``sha256``: its digest when the caller computed it while writing);
    raise :class:`ImageRefused` with the reason, or say what it is."""
    digest = sha256 or file_sha256(path)
    if expected_sha256 and digest != expected_sha256:
        raise ImageRefused(f"The file's sha256 is {digest}, not {expected_sha256} as expected.")
    size = path.stat().st_size
    if size == 0:
        raise ImageRefused("The file is empty.")
    with path.open("rb") as file:
        head = file.read(HEAD_BYTES)
    sniffed = sniffed_format(head)
    if sniffed is not None and sniffed != declared:
        raise ImageRefused(f"The file is a {sniffed} image, not {declared} as declared.")
    if sniffed == ImageFormat.QCOW2 and (reason := qcow2_header_refusal(head)):
        raise ImageRefused(reason)
    if declared == ImageFormat.RAW and size % SECTOR:
        raise ImageRefused(f"A raw disk is whole 512-byte sectors; the file has {size} bytes.")
    try:
        info = QemuTools.locate().img_info(path)
    except (QemuImgError, QemuNotInstalled, ValueError) as exc:
        raise ImageRefused(f"qemu-img cannot read the file as a disk image: {exc}") from exc
    if reason := info_refusal(info, declared):
        raise ImageRefused(reason)
    return Verified(digest, size, int(info.get("virtual-size") or size))
