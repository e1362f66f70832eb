"""What a VM is made of, as the driver needs it: `VmSpec` and its boot image.

The dictionary form (`VmSpec.to_dict` / `VmSpec.from_dict`) is the node-task contract's
`workers.contract.VmDescription`; it is also what the driver stores as ``run/<uuid>/spec.json`` so a
run directory describes itself after a worker restart. Validation happens here, once, with messages
naming the field.
"""

from __future__ import annotations

import uuid as uuid_module
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workers.contract import ImageDescription, VmDescription
from workers.qemu.errors import InvalidSpec
from workers.qemu.layout import canonical_uuid

DISK_FORMATS = ("qcow2", "raw")
# Generous ceilings that still catch unit mistakes (MiB given as bytes, GiB given as MiB).
MAX_VCPUS = 512
MAX_MEMORY_MB = 4 * 1024 * 1024
MAX_DISK_GB = 64 * 1024


@dataclass(frozen=True)
class DiskImage:
    """Boot from a base disk: the VM's disk is a qcow2 overlay backed by ``path``."""

    path: Path
    format: str = "qcow2"

    def __post_init__(self) -> None:
        _require_absolute("image.path", self.path)
        if self.format not in DISK_FORMATS:
            raise InvalidSpec(f"image.format must be one of {', '.join(DISK_FORMATS)}, not {self.format!r}")


@dataclass(frozen=True)
class KernelImage:
    """Boot a kernel + initramfs directly; the VM still gets an empty qcow2 disk of ``disk_gb``."""

    kernel_path: Path
    initrd_path: Path | None = None
    cmdline: str = ""

    def __post_init__(self) -> None:
        _require_absolute("image.kernel_path", self.kernel_path)
        if self.initrd_path is not None:
            _require_absolute("image.initrd_path", self.initrd_path)


Image = DiskImage | KernelImage


@dataclass(frozen=True)
class VmSpec:
    """One VM: identity, size, boot image and extra kernel arguments (kernel images only)."""

    uuid: str
    name: str
    vcpus: int
    memory_mb: int
    disk_gb: int
    image: Image
    extra_kernel_args: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        canonical = canonical_uuid(self.uuid)
        if canonical is None:
            raise InvalidSpec(f"uuid must be a UUID such as {uuid_module.uuid4()}, not {self.uuid!r}")
        object.__setattr__(self, "uuid", canonical)
        if not self.name or len(self.name) > 63:
            raise InvalidSpec("name must be 1 to 63 characters long")
        _require_range("vcpus", self.vcpus, 1, MAX_VCPUS)
        _require_range("memory_mb", self.memory_mb, 16, MAX_MEMORY_MB)
        _require_range("disk_gb", self.disk_gb, 1, MAX_DISK_GB)
        if self.extra_kernel_args and not isinstance(self.image, KernelImage):
            raise InvalidSpec("extra_kernel_args only apply to kernel images; this VM boots from a disk")
        for arg in self.extra_kernel_args:
            if not arg or any(ch.isspace() for ch in arg):
                raise InvalidSpec(f"each extra kernel argument must be one non-empty word, not {arg!r}")

    @property
    def kernel_cmdline(self) -> str:
        """The full kernel command line (image cmdline, then the extra arguments); empty for disks."""
        if not isinstance(self.image, KernelImage):
            return ""
        return " ".join(part for part in (self.image.cmdline, *self.extra_kernel_args) if part)

    def to_dict(self) -> VmDescription:
        """The contract/JSON form of this spec."""
        image: ImageDescription
        if isinstance(self.image, DiskImage):
            image = {"kind": "disk", "path": str(self.image.path), "format": self.image.format}
        else:
            image = {
                "kind": "kernel",
                "kernel_path": str(self.image.kernel_path),
                "initrd_path": str(self.image.initrd_path) if self.image.initrd_path else "",
                "cmdline": self.image.cmdline,
            }
        return {
            "id": self.uuid,
            "name": self.name,
            "vcpus": self.vcpus,
            "memory_mb": self.memory_mb,
            "disk_gb": self.disk_gb,
            "image": image,
            "extra_kernel_args": list(self.extra_kernel_args),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VmSpec:
        """Parse the contract/JSON form; unknown image keys (``name``, ``checksum``) are ignored."""
        try:
            image_data = data["image"]
            if not isinstance(image_data, Mapping):
                raise InvalidSpec("image must be an object")
            kind = image_data.get("kind", "disk")
            image: Image
            if kind == "disk":
                image = DiskImage(Path(image_data["path"]), str(image_data.get("format") or "qcow2"))
            elif kind == "kernel":
                initrd = image_data.get("initrd_path") or None
                image = KernelImage(
                    Path(image_data["kernel_path"]),
                    Path(initrd) if initrd else None,
                    str(image_data.get("cmdline") or ""),
                )
            else:
                raise InvalidSpec(f"image.kind must be 'disk' or 'kernel', not {kind!r}")
            extra = data.get("extra_kernel_args") or ()
            if isinstance(extra, str):
                extra = extra.split()
            return cls(
                uuid=str(data["id"] if "id" in data else data["uuid"]),
                name=str(data["name"]),
                vcpus=_as_int("vcpus", data["vcpus"]),
                memory_mb=_as_int("memory_mb", data["memory_mb"]),
                disk_gb=_as_int("disk_gb", data["disk_gb"]),
                image=image,
                extra_kernel_args=tuple(str(arg) for arg in extra),
            )
        except KeyError as exc:
            raise InvalidSpec(f"VM spec is missing the key {exc.args[0]!r}") from exc


def _as_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidSpec(f"{name} must be an integer, not {value!r}")
    return value


def _require_range(name: str, value: int, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidSpec(f"{name} must be an integer from {low} to {high}, not {value!r}")


def _require_absolute(name: str, path: Path) -> None:
    if not path.is_absolute() or ".." in path.parts:
        raise InvalidSpec(f"{name} must be an absolute path without '..' components, not {str(path)!r}")
