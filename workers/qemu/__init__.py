"""NovaCron's QEMU driver: create, start, stop, inspect and delete VMs on one node.

It runs `qemu-img` and a daemonized `qemu-system-x86_64` per VM and talks QMP through `qemu.qmp`.
It never imports Django: the node worker calls it and reports results through the control queue.

    driver = QemuDriver(DriverSettings(data_dir=Path("/var/lib/novacron")))
    driver.create(VmSpec.from_dict(task_kwargs["vm"]))
    status = driver.start(uuid)          # VmStatus(state=VmState.RUNNING, ...)
"""

from workers.qemu.accel import Accelerator, AcceleratorSetting, ProbeResult
from workers.qemu.driver import QemuDriver
from workers.qemu.errors import (
    DataDirError,
    InvalidSpec,
    NicsUnsupported,
    QemuError,
    QemuImgError,
    QemuNotInstalled,
    QemuStartError,
    QmpCommandError,
    QmpConnectError,
    QmpError,
    QmpProtocolError,
    QmpTimeout,
    VmNotFound,
    VmNotRunning,
)
from workers.qemu.layout import VmPaths
from workers.qemu.qmp import QmpEvent, QmpSession
from workers.qemu.settings import DriverSettings
from workers.qemu.spec import DiskImage, KernelImage, NetworkSpec, NicSpec, VmSpec
from workers.qemu.status import VmState, VmStatus

__all__ = [
    "Accelerator",
    "AcceleratorSetting",
    "DataDirError",
    "DiskImage",
    "DriverSettings",
    "InvalidSpec",
    "KernelImage",
    "NetworkSpec",
    "NicSpec",
    "NicsUnsupported",
    "ProbeResult",
    "QemuDriver",
    "QemuError",
    "QemuImgError",
    "QemuNotInstalled",
    "QemuStartError",
    "QmpCommandError",
    "QmpConnectError",
    "QmpError",
    "QmpEvent",
    "QmpProtocolError",
    "QmpSession",
    "QmpTimeout",
    "VmNotFound",
    "VmNotRunning",
    "VmPaths",
    "VmSpec",
    "VmState",
    "VmStatus",
]
