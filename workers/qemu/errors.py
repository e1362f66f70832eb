"""The QEMU driver's exceptions: one hierarchy rooted at `QemuError`.

Every message names what went wrong and what a person can do about it. Callers (the node worker's
Celery tasks) catch `QemuError` and report `str(exc)`; `code` is a stable machine-readable name.
"""

from __future__ import annotations


class QemuError(Exception):
    """Base class of every error raised by `workers.qemu`."""

    code = "qemu_error"


class QemuNotInstalled(QemuError):
    """A QEMU program is missing from PATH (or the configured path)."""

    code = "qemu_not_installed"


class DataDirError(QemuError):
    """The node's data directory cannot be created or written, or its path is unusable."""

    code = "data_dir_unusable"


class InvalidSpec(QemuError):
    """A VM spec (or a stored spec.json) is malformed."""

    code = "invalid_spec"


class NicsUnsupported(QemuError):
    """The VM has NICs and this driver cannot attach them (no device tag, or a tap is missing)."""

    code = "nics_unsupported"


class VmNotFound(QemuError):
    """No VM with this uuid was created in this data directory."""

    code = "vm_not_found"


class VmNotRunning(QemuError):
    """The operation needs a running QEMU and there is none."""

    code = "vm_not_running"


class QemuStartError(QemuError):
    """`qemu-system-x86_64` refused to start or died while starting."""

    code = "qemu_start_failed"


class QemuImgError(QemuError):
    """`qemu-img` failed."""

    code = "qemu_img_failed"


class QmpError(QemuError):
    """Any failure talking QMP to a QEMU process."""

    code = "qmp_error"


class QmpConnectError(QmpError):
    """The QMP socket could not be connected (QEMU gone, or another client holds the monitor)."""

    code = "qmp_connect_failed"


class QmpTimeout(QmpError):
    """QEMU did not answer (or the awaited event did not arrive) within the timeout."""

    code = "qmp_timeout"


class QmpProtocolError(QmpError):
    """QEMU's answer did not have the shape the driver expects, or the session broke."""

    code = "qmp_protocol_error"


class QmpCommandError(QmpError):
    """QEMU answered a command with an error object (``{"error": {"class", "desc"}}``)."""

    code = "qmp_command_failed"

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"QMP command {command!r} failed: {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc
