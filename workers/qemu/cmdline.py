"""The `qemu-system-x86_64` command line of a VM.

The disk is always the pair ``file0`` (file protocol node) + ``disk0`` (qcow2 format node) behind a
``virtio-blk-pci`` device: live migration mirrors ``disk0`` and exports it over NBD by that name, so
both ends of a migration must use exactly these node names. The serial console (first serial port,
``ttyS0``, chardev ``serial0`` on ``console.sock``) is the only console (``graphics=off`` also makes
SeaBIOS print there). Every VM also has a second serial port, the guest channel (``ttyS1``, chardev
``guest0`` on ``guest.sock``), for machine-to-machine lines such as the test guest's requests; both ends
of a migration have both ports, in this order.

NIC ``i`` is ``-netdev tap,id=net<i>`` on the node's persistent tap (created and bridged by the node
before QEMU starts; QEMU runs no scripts) behind ``-device virtio-net-pci,id=nic<i>`` with the spec's
MAC and no option ROM (``romfile=``): nothing boots from the network, SeaBIOS skips iPXE, and a ROM
differing between two hosts' ipxe packages cannot make a migration fail on a RAM block size mismatch.
Only the tap's name differs between the ends of a migration (it carries each node's tag); the guest
sees the same devices.

A VM with a cloud-init seed gets ``seed.iso`` as a read-only CD on the q35 machine's built-in AHCI
(``ide-cd`` on ``ide.0``), node names ``seed-file`` + ``seed0``. Nothing mirrors it in a live migration
(only ``disk0`` moves): the destination rebuilds the identical image from the spec and has the same
device.
"""

from __future__ import annotations

from pathlib import Path

from workers.net.names import tap_name
from workers.qemu.accel import Accelerator
from workers.qemu.errors import NicsUnsupported
from workers.qemu.layout import VmPaths
from workers.qemu.spec import KernelImage, VmSpec

FILE_NODE = "file0"
DISK_NODE = "disk0"
SEED_FILE_NODE = "seed-file"
SEED_NODE = "seed0"


def qemu_command(
    qemu_system: Path,
    spec: VmSpec,
    paths: VmPaths,
    *,
    accelerator: Accelerator,
    cpu_model: str,
    device_tag: str = "",
    incoming: bool = False,
) -> list[str]:
    """The full argument vector that starts ``spec`` daemonized with its run files in ``paths``.

    ``device_tag`` is the node's tag in its taps' names (`workers.net.names`); without one a spec
    with NICs raises `NicsUnsupported`. ``incoming`` starts a live-migration destination: CPUs
    stopped (``-S``, so it stays paused after the migration completes until told ``cont``) and
    waiting for ``migrate-incoming`` (``-incoming defer``).
    """
    command = [
        str(qemu_system),
        "-name", f"guest={opt_escape(spec.name)}",
        "-uuid", spec.uuid,
        "-machine", f"q35,accel={accelerator},graphics=off",
        "-cpu", cpu_model,
        "-smp", str(spec.vcpus),
        "-m", str(spec.memory_mb),
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-nic", "none",
        "-daemonize",
        "-pidfile", str(paths.pidfile),
        "-D", str(paths.qemu_log),  # also keeps QEMU's error messages once stderr is gone
        "-qmp", f"unix:{opt_escape(paths.qmp_socket)},server=on,wait=off",
        "-qmp", f"unix:{opt_escape(paths.jobs_socket)},server=on,wait=off",
        # The console is a socket (input for the guest, e.g. the test guest's requests) that also logs
        # everything the guest prints to the serial log, whether or not anyone is connected.
        "-chardev",
        f"socket,id=serial0,path={opt_escape(paths.console_socket)},server=on,wait=off,"
        f"logfile={opt_escape(paths.serial_log)}",
        "-serial", "chardev:serial0",
        # The guest channel: a second serial port, so programs never share the user's console.
        "-chardev",
        f"socket,id=guest0,path={opt_escape(paths.guest_socket)},server=on,wait=off,"
        f"logfile={opt_escape(paths.guest_log)}",
        "-serial", "chardev:guest0",
        "-blockdev", f"driver=file,filename={opt_escape(paths.disk)},node-name={FILE_NODE}",
        "-blockdev", f"driver=qcow2,file={FILE_NODE},node-name={DISK_NODE}",
        "-device", f"virtio-blk-pci,drive={DISK_NODE},id=virtio-{DISK_NODE}",
    ]  # fmt: skip
    if spec.seed is not None:
        command += seed_arguments(paths)
    command += nic_arguments(spec, device_tag)
    if isinstance(spec.image, KernelImage):
        command += ["-kernel", str(spec.image.kernel_path)]
        if spec.image.initrd_path is not None:
            command += ["-initrd", str(spec.image.initrd_path)]
        command += ["-append", spec.kernel_cmdline]
    if incoming:
        command += ["-S", "-incoming", "defer"]
    return command


def seed_arguments(paths: VmPaths) -> list[str]:
    """The read-only CD drive of the VM's cloud-init seed image."""
    return [
        "-blockdev", f"driver=file,filename={opt_escape(paths.seed)},node-name={SEED_FILE_NODE},read-only=on",
        "-blockdev", f"driver=raw,file={SEED_FILE_NODE},node-name={SEED_NODE},read-only=on",
        "-device", f"ide-cd,drive={SEED_NODE},bus=ide.0,id=cd-{SEED_NODE}",
    ]  # fmt: skip


def nic_arguments(spec: VmSpec, device_tag: str) -> list[str]:
    """The ``-netdev``/``-device`` pairs of the spec's NICs, in guest order (``eth0`` first)."""
    arguments: list[str] = []
    for index, (nic, tap) in enumerate(zip(spec.nics, tap_names(spec, device_tag), strict=True)):
        arguments += [
            "-netdev", f"tap,id=net{index},ifname={tap},script=no,downscript=no",
            "-device", f"virtio-net-pci,netdev=net{index},mac={nic.mac},id=nic{index},romfile=",
        ]  # fmt: skip
    return arguments


def tap_names(spec: VmSpec, device_tag: str) -> list[str]:
    """The node's taps of the spec's NICs, in order; `NicsUnsupported` without a ``device_tag``."""
    if spec.nics and not device_tag:
        raise NicsUnsupported(
            f"VM {spec.uuid} has {len(spec.nics)} NIC(s) but this node's QEMU driver cannot attach NICs "
            "(it has no device tag); start the node worker with networking enabled"
        )
    return [tap_name(device_tag, spec.uuid, index) for index in range(len(spec.nics))]


def opt_escape(value: Path | str) -> str:
    """Escape a value for QEMU's ``key=value,...`` option syntax (a literal comma is doubled)."""
    return str(value).replace(",", ",,")
