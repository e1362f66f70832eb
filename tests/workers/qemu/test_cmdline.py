"""The QEMU command line of a VM: its two serial ports, its NICs as tap netdevs behind virtio-net-pci devices."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from workers.net.names import tap_name
from workers.qemu import Accelerator, KernelImage, NetworkSpec, NicSpec, NicsUnsupported, VmSpec
from workers.qemu.cmdline import nic_arguments, qemu_command
from workers.qemu.layout import NodeLayout

NETWORK = NetworkSpec(id="n1", name="blue", vni=100, cidr="10.20.0.0/24", gateway="10.20.0.1", mtu=1450)
OTHER = NetworkSpec(id="n2", name="red", vni=101, cidr="10.21.0.0/24", gateway="10.21.0.1", mtu=1450)


def spec_with(*nics: NicSpec) -> VmSpec:
    return VmSpec(str(uuid.uuid4()), "vm", 1, 128, 1, KernelImage(Path("/g/vmlinux")), nics=nics)


def test_each_nic_is_a_tap_netdev_behind_a_virtio_net_device_without_option_rom():
    spec = spec_with(
        NicSpec("52:54:00:00:00:0a", "10.20.0.10", NETWORK), NicSpec("52:54:00:00:00:0b", "10.21.0.7", OTHER)
    )
    taps = [tap_name("beef", spec.uuid, 0), tap_name("beef", spec.uuid, 1)]
    assert nic_arguments(spec, "beef") == [
        "-netdev", f"tap,id=net0,ifname={taps[0]},script=no,downscript=no",
        "-device", "virtio-net-pci,netdev=net0,mac=52:54:00:00:00:0a,id=nic0,romfile=",
        "-netdev", f"tap,id=net1,ifname={taps[1]},script=no,downscript=no",
        "-device", "virtio-net-pci,netdev=net1,mac=52:54:00:00:00:0b,id=nic1,romfile=",
    ]  # fmt: skip


def test_two_nodes_build_the_same_devices_on_their_own_taps():
    # A migration's ends: the guest-visible devices are identical, only the host tap differs.
    spec = spec_with(NicSpec("52:54:00:00:00:0a", "10.20.0.10", NETWORK))
    source, dest = nic_arguments(spec, "aaaa"), nic_arguments(spec, "bbbb")
    assert source[3] == dest[3]
    assert source[1] != dest[1] and tap_name("bbbb", spec.uuid, 0) in dest[1]


def test_the_full_command_line_holds_the_nics_and_no_nic_without_them(tmp_path: Path):
    paths = NodeLayout(tmp_path).vm(str(uuid.uuid4()))
    with_nic = spec_with(NicSpec("52:54:00:00:00:0a", "10.20.0.10", NETWORK))
    command = qemu_command(
        Path("/usr/bin/qemu-system-x86_64"),
        with_nic,
        paths,
        accelerator=Accelerator.TCG,
        cpu_model="max",
        device_tag="beef",
    )
    assert "virtio-net-pci,netdev=net0,mac=52:54:00:00:00:0a,id=nic0,romfile=" in command
    bare = qemu_command(
        Path("/usr/bin/qemu-system-x86_64"), spec_with(), paths, accelerator=Accelerator.TCG, cpu_model="max"
    )
    assert "-netdev" not in bare and "-nic" in bare


def test_a_driver_without_a_device_tag_cannot_build_nics():
    spec = spec_with(NicSpec("52:54:00:00:00:0a", "10.20.0.10", NETWORK))
    with pytest.raises(
        NicsUnsupported, match=r"has 1 NIC\(s\) but this node's QEMU driver cannot attach NICs"
    ):
        nic_arguments(spec, "")
    assert nic_arguments(spec_with(), "") == []


def test_every_vm_has_the_console_then_the_guest_channel_as_serial_ports_on_both_ends(tmp_path: Path):
    spec = spec_with()
    ends = [
        qemu_command(
            Path("/usr/bin/qemu-system-x86_64"),
            spec,
            NodeLayout(tmp_path / node).vm(spec.uuid),
            accelerator=Accelerator.TCG,
            cpu_model="max",
            incoming=incoming,
        )
        for node, incoming in (("source", False), ("dest", True))
    ]
    for command, node in zip(ends, ("source", "dest"), strict=True):
        paths = NodeLayout(tmp_path / node).vm(spec.uuid)
        serials = [command[index + 1] for index, arg in enumerate(command) if arg == "-serial"]
        assert serials == ["chardev:serial0", "chardev:guest0"]  # ttyS0, ttyS1: the same on both ends
        chardevs = [command[index + 1] for index, arg in enumerate(command) if arg == "-chardev"]
        assert chardevs == [
            f"socket,id=serial0,path={paths.console_socket},server=on,wait=off,logfile={paths.serial_log}",
            f"socket,id=guest0,path={paths.guest_socket},server=on,wait=off,logfile={paths.guest_log}",
        ]
