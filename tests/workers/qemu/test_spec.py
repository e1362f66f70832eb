"""VmSpec: the contract dictionary form, validation messages, and the kernel command line."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from workers.qemu import DiskImage, InvalidSpec, KernelImage, VmSpec

VM_ID = "6f1c2a8e-3b7d-4e55-9a10-2c4b5d6e7f80"


def contract_dict(**overrides: object) -> dict[str, object]:
    data: dict[str, object] = {
        "id": VM_ID,
        "name": "web-1",
        "vcpus": 2,
        "memory_mb": 512,
        "disk_gb": 4,
        "image": {"name": "debian", "kind": "disk", "format": "qcow2", "path": "/srv/images/debian.qcow2"},
    }
    data.update(overrides)
    return data


def test_a_contract_dict_round_trips_through_the_spec():
    spec = VmSpec.from_dict(contract_dict())
    assert spec.image == DiskImage(Path("/srv/images/debian.qcow2"), "qcow2")
    assert VmSpec.from_dict(spec.to_dict()) == spec
    assert spec.to_dict()["id"] == VM_ID


def test_a_kernel_image_builds_its_command_line_from_image_and_extra_arguments():
    spec = VmSpec.from_dict(
        contract_dict(
            image={
                "kind": "kernel",
                "kernel_path": "/g/vmlinux",
                "initrd_path": "/g/initrd.img",
                "cmdline": "console=ttyS0",
            },
            extra_kernel_args=["dirty_mb=64", "dirty_rate_mb=8"],
        )
    )
    assert isinstance(spec.image, KernelImage)
    assert spec.kernel_cmdline == "console=ttyS0 dirty_mb=64 dirty_rate_mb=8"
    assert VmSpec.from_dict(spec.to_dict()) == spec


def test_the_uuid_is_canonicalised():
    assert VmSpec.from_dict(contract_dict(id=VM_ID.upper())).uuid == VM_ID


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"id": "not-a-uuid"}, "uuid must be a UUID"),
        ({"vcpus": 0}, "vcpus must be an integer from 1"),
        ({"memory_mb": "512"}, "memory_mb must be an integer"),
        ({"disk_gb": True}, "disk_gb must be an integer"),
        ({"name": ""}, "name must be 1 to 63 characters"),
        ({"image": {"kind": "iso", "path": "/x"}}, "image.kind must be 'disk' or 'kernel'"),
        ({"image": {"kind": "disk", "path": "relative.qcow2"}}, "image.path must be an absolute path"),
        ({"image": {"kind": "disk", "path": "/a/../b"}}, "without '..'"),
        ({"image": {"kind": "disk", "path": "/a", "format": "vmdk"}}, "image.format must be one of"),
        ({"extra_kernel_args": ["x=1"]}, "only apply to kernel images"),
    ],
)
def test_bad_specs_are_refused_naming_the_field(overrides, message):
    with pytest.raises(InvalidSpec, match=message):
        VmSpec.from_dict(contract_dict(**overrides))


def test_a_missing_key_is_named():
    data = contract_dict()
    del data["memory_mb"]
    with pytest.raises(InvalidSpec, match="missing the key 'memory_mb'"):
        VmSpec.from_dict(data)


def test_extra_kernel_arguments_must_be_single_words():
    image = KernelImage(Path("/g/vmlinux"))
    with pytest.raises(InvalidSpec, match="one non-empty word"):
        VmSpec(str(uuid.uuid4()), "vm", 1, 128, 1, image, ("a b",))
