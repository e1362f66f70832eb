"""What a node's QEMU driver is configured with: `DriverSettings`, checked when it is made."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from workers.qemu.accel import DEFAULT_PROBE_TIMEOUT, Accelerator, AcceleratorSetting
from workers.qemu.errors import QemuError
from workers.qemu.qmp import DEFAULT_QMP_TIMEOUT


@dataclass(frozen=True)
class DriverSettings:
    """Per-node driver options; everything but ``data_dir`` has a default."""

    data_dir: Path
    accelerator: AcceleratorSetting = AcceleratorSetting.AUTO
    powerdown_timeout: float = 60.0  # how long stop waits for the guest to act on ACPI powerdown
    quit_timeout: float = 10.0  # how long stop waits for QEMU to exit after `quit`
    start_timeout: float = 30.0  # how long QEMU may take to daemonize
    qmp_timeout: float = DEFAULT_QMP_TIMEOUT
    probe_timeout: float = DEFAULT_PROBE_TIMEOUT
    cpu_model: str | None = None  # None: "host" under KVM, "max" under TCG
    qemu_system: str = "qemu-system-x86_64"
    qemu_img: str = "qemu-img"

    def __post_init__(self) -> None:
        # Settings often arrive as plain strings from the environment: normalise and check them here.
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        try:
            object.__setattr__(self, "accelerator", AcceleratorSetting(self.accelerator))
        except ValueError as exc:
            raise QemuError(f"accelerator must be one of kvm, tcg, auto; not {self.accelerator!r}") from exc
        for name in ("powerdown_timeout", "quit_timeout", "start_timeout", "qmp_timeout", "probe_timeout"):
            if not getattr(self, name) >= 0:
                raise QemuError(f"{name} must be a number of seconds >= 0, not {getattr(self, name)!r}")

    def cpu_model_for(self, accelerator: Accelerator) -> str:
        if self.cpu_model:
            return self.cpu_model
        return "host" if accelerator is Accelerator.KVM else "max"
