"""Choosing the accelerator: the ``kvm|tcg|auto`` setting and the KVM probe behind ``auto``.

Whether ``/dev/kvm`` exists says little: on nested hosts (the ``kvm_pvm`` flavour on our CI
machines) it exists, a BIOS runs under it, but a Linux guest never boots. So ``auto`` runs a probe
that takes the path a Linux kernel takes, under the same ``-machine``/``-cpu`` a VM would get:

* firmware boot, then a multiboot payload entered in 32-bit protected mode;
* the payload builds 4-level page tables, enables PAE + long mode + paging, far-jumps to 64-bit code;
* it stores to every cache line of 16 MiB of guest memory, 4 times over, through those page tables
  (a kernel decompressor's work in miniature), reads the last store back, prints a marker on the
  serial port and exits QEMU via ``isa-debug-exit`` with a known status (another one on a mismatch).

KVM is usable when QEMU exits with that status and the marker was printed within the timeout (3 s by
default). On nested ``kvm_pvm`` hosts, with ``-cpu host`` QEMU aborts at once (it cannot set MSR
0x10a) and with ``-cpu qemu64`` the probe runs far slower than under TCG; hardware KVM finishes in
well under a second. A KVM slower than TCG is not worth using, so the timeout doubles as a
performance floor. The result is cached per node in ``DATA/accel-probe.json``, keyed by QEMU
version, host kernel release and CPU model.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

from workers.qemu.errors import QemuError
from workers.qemu.tools import QemuTools


class Accelerator(StrEnum):
    KVM = "kvm"
    TCG = "tcg"


class AcceleratorSetting(StrEnum):
    KVM = "kvm"
    TCG = "tcg"
    AUTO = "auto"


DEFAULT_PROBE_TIMEOUT = 3.0
PROBE_MARKER = b"NOVACRON-KVM-PROBE-OK"
PROBE_EXIT_VALUE = 0x31  # written to isa-debug-exit; QEMU then exits with (value << 1) | 1
PROBE_EXIT_STATUS = (PROBE_EXIT_VALUE << 1) | 1
PROBE_MISMATCH_VALUE = 0x32  # exit value when memory did not read back what the payload stored
DEBUG_EXIT_PORT = 0xF4
SERIAL_PORT = 0x3F8

# Payload memory map (guest-physical; multiboot loads the payload at 1 MiB).
LOAD_ADDRESS = 0x100000
PML4_ADDRESS = 0x200000
PDPT_ADDRESS = 0x201000
PD_ADDRESS = 0x202000
IDENTITY_MAPPED_MB = 32  # 16 large pages of 2 MiB: the payload, the tables and the scratch area
SCRATCH_START = 0x400000
SCRATCH_END = 0x1400000  # 16 MiB of scratch memory the payload writes to
SCRATCH_PASSES = 4
SCRATCH_STRIDE = 64  # one store per cache line
MULTIBOOT_MAGIC = 0x1BADB002
MULTIBOOT_FLAG_ADDRESSES = 0x00010000  # header carries load addresses: a flat binary, no ELF
MULTIBOOT_HEADER_SIZE = 32
PAGE_PRESENT_WRITABLE = 0x3
PAGE_LARGE = 0x80
EFER_MSR = 0xC0000080
EFER_LME = 0x100
CR4_PAE = 0x20
CR0_PE_PG = 0x80000001
LONG_MODE_CODE_DESCRIPTOR = 0x00AF9A000000FFFF  # present, ring 0, code, L=1


def build_probe_payload() -> bytes:
    """The multiboot flat binary described in the module docstring, assembled by hand."""
    code = bytearray()

    def store32(address: int, value: int) -> None:
        code.extend(b"\xc7\x05" + struct.pack("<II", address, value))  # mov dword [address], value

    def serial_write(text: bytes) -> None:
        code.extend(b"\x66\xba" + struct.pack("<H", SERIAL_PORT))  # mov dx, SERIAL_PORT
        for byte in text:
            code.extend(bytes((0xB0, byte, 0xEE)))  # mov al, byte; out dx, al

    def exit_with(value: int) -> None:
        code.extend(b"\xb0" + bytes((value,)))  # mov al, value
        code.extend(b"\xe6" + bytes((DEBUG_EXIT_PORT,)))  # out DEBUG_EXIT_PORT, al
        code.extend(b"\xf4\xeb\xfd")  # hlt; jmp hlt  (not reached when isa-debug-exit is present)

    # 32-bit protected mode, paging off: page tables, then PAE, EFER.LME, CR3 and CR0.PG.
    store32(PML4_ADDRESS, PDPT_ADDRESS | PAGE_PRESENT_WRITABLE)
    store32(PDPT_ADDRESS, PD_ADDRESS | PAGE_PRESENT_WRITABLE)
    for index in range(IDENTITY_MAPPED_MB // 2):
        store32(PD_ADDRESS + 8 * index, (index << 21) | PAGE_LARGE | PAGE_PRESENT_WRITABLE)
    code.extend(b"\x0f\x20\xe0")  # mov eax, cr4
    code.extend(b"\x83\xc8" + bytes((CR4_PAE,)))  # or eax, CR4_PAE
    code.extend(b"\x0f\x22\xe0")  # mov cr4, eax
    code.extend(b"\xb8" + struct.pack("<I", PML4_ADDRESS))  # mov eax, PML4_ADDRESS
    code.extend(b"\x0f\x22\xd8")  # mov cr3, eax
    code.extend(b"\xb9" + struct.pack("<I", EFER_MSR))  # mov ecx, EFER_MSR
    code.extend(b"\x0f\x32")  # rdmsr
    code.extend(b"\x0d" + struct.pack("<I", EFER_LME))  # or eax, EFER_LME
    code.extend(b"\x0f\x30")  # wrmsr
    code.extend(b"\x0f\x20\xc0")  # mov eax, cr0
    code.extend(b"\x0d" + struct.pack("<I", CR0_PE_PG))  # or eax, CR0_PE_PG
    code.extend(b"\x0f\x22\xc0")  # mov cr0, eax
    lgdt_at = len(code)
    code.extend(b"\x0f\x01\x15" + bytes(4))  # lgdt [gdtr]  (address patched below)
    far_jump_at = len(code)
    code.extend(b"\xea" + bytes(4) + b"\x08\x00")  # jmp 0x08:long_mode  (offset patched below)

    # 64-bit long mode: write the scratch area SCRATCH_PASSES times, then report and exit.
    long_mode_at = len(code)
    code.extend(b"\xb9" + struct.pack("<I", SCRATCH_PASSES))  # mov ecx, SCRATCH_PASSES
    outer_loop = len(code)
    code.extend(b"\xbf" + struct.pack("<I", SCRATCH_START))  # mov edi, SCRATCH_START
    inner_loop = len(code)
    code.extend(b"\x48\x89\x0f")  # mov [rdi], rcx
    code.extend(b"\x48\x83\xc7" + bytes((SCRATCH_STRIDE,)))  # add rdi, SCRATCH_STRIDE
    code.extend(b"\x48\x81\xff" + struct.pack("<I", SCRATCH_END))  # cmp rdi, SCRATCH_END
    code.extend(b"\x72" + struct.pack("<b", inner_loop - (len(code) + 2)))  # jb inner_loop
    code.extend(b"\xe2" + struct.pack("<b", outer_loop - (len(code) + 2)))  # loop outer_loop
    # The last pass stored rcx = 1: read the last line back before claiming success.
    code.extend(b"\x48\x8b\x04\x25" + struct.pack("<I", SCRATCH_END - SCRATCH_STRIDE))  # mov rax, [..]
    code.extend(b"\x48\x83\xf8\x01")  # cmp rax, 1
    mismatch_jump_at = len(code)
    code.extend(b"\x75\x00")  # jne mismatch  (displacement patched below)
    serial_write(b"\n" + PROBE_MARKER + b"\n")
    exit_with(PROBE_EXIT_VALUE)
    code[mismatch_jump_at + 1] = len(code) - (mismatch_jump_at + 2)
    exit_with(PROBE_MISMATCH_VALUE)

    while len(code) % 8:
        code.append(0x90)  # nop: align the GDT
    gdt_at = len(code)
    code.extend(struct.pack("<QQ", 0, LONG_MODE_CODE_DESCRIPTOR))
    gdtr_at = len(code)
    code.extend(struct.pack("<HI", 15, LOAD_ADDRESS + MULTIBOOT_HEADER_SIZE + gdt_at))
    struct.pack_into("<I", code, lgdt_at + 3, LOAD_ADDRESS + MULTIBOOT_HEADER_SIZE + gdtr_at)
    struct.pack_into("<I", code, far_jump_at + 1, LOAD_ADDRESS + MULTIBOOT_HEADER_SIZE + long_mode_at)

    entry = LOAD_ADDRESS + MULTIBOOT_HEADER_SIZE
    checksum = -(MULTIBOOT_MAGIC + MULTIBOOT_FLAG_ADDRESSES) & 0xFFFFFFFF
    header = struct.pack(
        "<8I",
        MULTIBOOT_MAGIC,
        MULTIBOOT_FLAG_ADDRESSES,
        checksum,
        LOAD_ADDRESS,  # header_addr: the header is the first thing loaded
        LOAD_ADDRESS,  # load_addr
        0,  # load_end_addr: 0 = the whole file
        0,  # bss_end_addr: no bss
        entry,
    )
    return header + bytes(code)


@dataclass(frozen=True)
class ProbeResult:
    """The outcome of one KVM probe and what it was run against."""

    kvm_usable: bool
    reason: str
    elapsed_s: float
    qemu_version: str
    kernel_release: str
    cpu_model: str
    probed_at: str

    def matches(self, qemu_version: str, kernel_release: str, cpu_model: str) -> bool:
        return (self.qemu_version, self.kernel_release, self.cpu_model) == (
            qemu_version,
            kernel_release,
            cpu_model,
        )


def probe_kvm(
    tools: QemuTools, *, cpu_model: str = "host", timeout: float = DEFAULT_PROBE_TIMEOUT
) -> ProbeResult:
    """Run the probe payload under KVM now (no cache); never raises for a failing KVM."""
    qemu_version = tools.version()
    started = time.monotonic()

    def result(usable: bool, reason: str) -> ProbeResult:
        return ProbeResult(
            kvm_usable=usable,
            reason=reason,
            elapsed_s=round(time.monotonic() - started, 3),
            qemu_version=qemu_version,
            kernel_release=os.uname().release,
            cpu_model=cpu_model,
            probed_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )

    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return result(False, "/dev/kvm is missing or not read-writable by this user")
    usable, reason = run_probe_guest(tools, Accelerator.KVM, cpu_model=cpu_model, timeout=timeout)
    return result(usable, reason)


def run_probe_guest(
    tools: QemuTools, accelerator: Accelerator, *, cpu_model: str, timeout: float
) -> tuple[bool, str]:
    """Boot the probe payload under ``accelerator``; (finished correctly in time, explanation)."""
    with tempfile.TemporaryDirectory(prefix="novacron-accel-probe-") as scratch:
        payload = Path(scratch) / "probe.bin"
        payload.write_bytes(build_probe_payload())
        command = [
            str(tools.system),
            "-machine", f"q35,accel={accelerator}",
            "-cpu", cpu_model,
            "-m", "64",
            "-nodefaults",
            "-display", "none",
            "-no-reboot",
            "-serial", "stdio",
            "-device", f"isa-debug-exit,iobase={DEBUG_EXIT_PORT:#x},iosize=4",
            "-kernel", str(payload),
        ]  # fmt: skip
        with subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        ) as process:
            try:
                stdout, stderr = process.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()
                return False, (
                    f"the probe guest did not finish within {timeout:g} s under {accelerator} (TCG runs it "
                    "in about 0.25 s): this accelerator cannot run a 64-bit paged guest at useful speed"
                )
    if process.returncode == PROBE_EXIT_STATUS and PROBE_MARKER in stdout:
        return (
            True,
            f"the probe guest reached 64-bit mode, wrote its scratch memory and exited under {accelerator}",
        )
    if process.returncode == (PROBE_MISMATCH_VALUE << 1) | 1:
        return False, f"guest memory did not read back what the probe guest stored under {accelerator}"
    how = (
        f"was killed by signal {-process.returncode}"
        if process.returncode < 0
        else f"exited with status {process.returncode}"
    )
    detail = stderr.decode(errors="replace").strip().splitlines()[-2:]
    return False, (
        f"QEMU {how} under {accelerator} before the probe guest finished"
        + (f": {' / '.join(detail)}" if detail else "")
    )


def cached_probe_kvm(
    tools: QemuTools,
    cache_path: Path,
    *,
    cpu_model: str = "host",
    timeout: float = DEFAULT_PROBE_TIMEOUT,
) -> ProbeResult:
    """`probe_kvm`, cached in ``cache_path`` until QEMU, the host kernel or the CPU model change."""
    qemu_version = tools.version()
    kernel_release = os.uname().release
    try:
        cached = ProbeResult(**json.loads(cache_path.read_text()))
        if cached.matches(qemu_version, kernel_release, cpu_model):
            return cached
    except (OSError, ValueError, TypeError):
        pass  # no cache yet, or one written by another version of this module: probe again
    fresh = probe_kvm(tools, cpu_model=cpu_model, timeout=timeout)
    temporary = cache_path.with_suffix(f".tmp-{os.getpid()}")
    temporary.write_text(json.dumps(asdict(fresh), indent=2) + "\n")
    temporary.replace(cache_path)
    return fresh


def resolve_accelerator(
    setting: AcceleratorSetting,
    tools: QemuTools,
    cache_path: Path,
    *,
    cpu_model: str = "host",
    timeout: float = DEFAULT_PROBE_TIMEOUT,
) -> Accelerator:
    """The accelerator to run VMs with: the setting itself, or the probe's verdict for ``auto``."""
    if setting == AcceleratorSetting.TCG:
        return Accelerator.TCG
    if setting == AcceleratorSetting.KVM:
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            raise QemuError(
                "accelerator is set to kvm but /dev/kvm is missing or not read-writable; "
                "load the kvm module and add the worker's user to the kvm group, or set the accelerator "
                "to tcg"
            )
        return Accelerator.KVM
    probe = cached_probe_kvm(tools, cache_path, cpu_model=cpu_model, timeout=timeout)
    return Accelerator.KVM if probe.kvm_usable else Accelerator.TCG
