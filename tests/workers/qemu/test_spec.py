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


def network_dict(**overrides: object) -> dict[str, object]:
    data: dict[str, object] = {
        "id": "net-7",
        "name": "blue",
        "vni": 4242,
        "cidr": "10.20.0.0/24",
        "gateway": "10.20.0.1",
        "dns": ["10.20.0.1"],
        "mtu": 1450,
        "external": False,
        "physical_network": "",
    }
    data.update(overrides)
    return data


def nic_dict(mac: str = "52:54:00:aa:bb:01", ipv4: str = "10.20.0.5", **network: object) -> dict[str, object]:
    return {"mac": mac, "ipv4": ipv4, "network": network_dict(**network)}


def test_nics_round_trip_with_their_whole_network():
    data = contract_dict(
        nics=[
            nic_dict(),
            nic_dict("52:54:00:AA:BB:02", "10.30.0.9", cidr="10.30.0.0/16", gateway="10.30.0.1", vni=7),
        ]
    )
    spec = VmSpec.from_dict(data)
    assert [nic.mac for nic in spec.nics] == ["52:54:00:aa:bb:01", "52:54:00:aa:bb:02"]
    assert spec.nics[1].network.vni == 7 and spec.nics[1].prefix_length == 16
    assert spec.to_dict()["nics"][0] == nic_dict()  # the contract form, network included, unchanged
    assert VmSpec.from_dict(spec.to_dict()) == spec


def test_a_spec_without_nics_has_none():
    assert VmSpec.from_dict(contract_dict()).nics == ()
    assert VmSpec.from_dict(contract_dict(nics=[])).to_dict()["nics"] == []


@pytest.mark.parametrize(
    ("nics", "message"),
    [
        ("eth0", "nics must be a list"),
        (["eth0"], "each NIC must be an object"),
        ([nic_dict(mac="52:54:00:aa:bb")], "nic.mac must be six colon-separated hex bytes"),
        ([nic_dict(mac="52-54-00-aa-bb-01")], "nic.mac must be six colon-separated hex bytes"),
        ([nic_dict(mac="01:00:5e:00:00:01")], "multicast address; a NIC needs a unicast MAC"),
        ([nic_dict(mac="00:00:00:00:00:00")], "must not be all zeros"),
        (
            [nic_dict(ipv4="10.21.0.5")],
            r"nic.ipv4 10.21.0.5 is not a host address of the network's 10.20.0.0/24",
        ),
        ([nic_dict(ipv4="10.20.0.255")], "is not a host address"),
        ([nic_dict(ipv4="10.20.0.1")], "is the network's gateway address"),
        ([nic_dict(ipv4="fe80::1")], "nic.ipv4 must be an IPv4 address"),
        ([nic_dict(vni=0)], "network.vni must be an integer from 1 to 16777215"),
        ([nic_dict(vni=2**24)], "network.vni must be an integer from 1 to 16777215"),
        ([nic_dict(cidr="10.20.0.1/24")], "network.cidr must be an IPv4 network"),
        ([nic_dict(gateway="10.99.0.1")], "network.gateway 10.99.0.1 is not a host address of 10.20.0.0/24"),
        ([nic_dict(dns=["dns.example"])], "network.dns must be an IPv4 address"),
        ([nic_dict(mtu=100)], "network.mtu must be an integer from 576"),
        ([nic_dict(external="yes")], "network.external must be true or false"),
        ([{"mac": "52:54:00:aa:bb:01", "ipv4": "10.20.0.5"}], "missing the key 'network'"),
        ([{**nic_dict(), "network": "blue"}], "nic.network must be an object"),
        ([nic_dict(), nic_dict(ipv4="10.20.0.6")], "each NIC needs its own MAC; repeated: 52:54:00:aa:bb:01"),
        (
            [nic_dict(f"52:54:00:aa:bb:{i:02x}", f"10.20.0.{10 + i}") for i in range(9)],
            "at most 8 NICs, not 9",
        ),
    ],
)
def test_bad_nics_are_refused_naming_the_field(nics, message):
    with pytest.raises(InvalidSpec, match=message):
        VmSpec.from_dict(contract_dict(nics=nics))
