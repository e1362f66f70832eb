"""Kernel image helpers for the test guest: extracting the uncompressed ELF ``vmlinux`` from a Debian
``vmlinuz`` (bzImage with an XZ payload), checking that it can be PVH-booted, and ordering kernel modules
by the ``depends=`` field of their ``.modinfo`` section (Debian ships no ``modules.dep``; depmod makes it
at install time, and we install nothing).
"""

from __future__ import annotations

import lzma
import struct
from collections.abc import Iterable, Mapping

XZ_MAGIC = b"\xfd7zXZ\x00"
ELF_MAGIC = b"\x7fELF"
# Xen ELF note type carrying the 32-bit physical entry point that QEMU uses for PVH boot.
XEN_ELFNOTE_PHYS32_ENTRY = 18
PT_NOTE = 4


class KernelError(RuntimeError):
    """The kernel image or its modules are not what the test guest needs."""


def extract_vmlinux(bzimage: bytes) -> bytes:
    """Decompress the XZ payload of a bzImage and return the ELF kernel inside.

    The XZ magic can also occur by chance elsewhere in the image, so every occurrence is tried until one
    decompresses to an ELF file.
    """
    start = bzimage.find(XZ_MAGIC)
    while start != -1:
        decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        try:
            data = decompressor.decompress(bzimage[start:])
        except lzma.LZMAError:
            data = b""
        if decompressor.eof and data.startswith(ELF_MAGIC):
            return data
        start = bzimage.find(XZ_MAGIC, start + 1)
    raise KernelError("no XZ-compressed ELF kernel found in the bzImage")


def _elf_notes(elf: bytes) -> Iterable[tuple[bytes, int]]:
    """(owner name, note type) of every note in the PT_NOTE segments of a little-endian ELF64 file."""
    if not elf.startswith(ELF_MAGIC) or elf[4] != 2 or elf[5] != 1:
        raise KernelError("not a little-endian 64-bit ELF file")
    phoff = struct.unpack_from("<Q", elf, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for index in range(phnum):
        p_type, _flags, p_offset, _vaddr, _paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", elf, phoff + index * phentsize
        )
        if p_type != PT_NOTE:
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, note_type = struct.unpack_from("<III", elf, pos)
            name_start = pos + 12
            desc_start = name_start + ((namesz + 3) & ~3)
            yield elf[name_start : name_start + namesz].rstrip(b"\0"), note_type
            pos = desc_start + ((descsz + 3) & ~3)


def has_pvh_entry(elf: bytes) -> bool:
    """Whether the ELF kernel carries the Xen PHYS32_ENTRY note that QEMU's ``-kernel`` PVH boot needs."""
    return any(name == b"Xen" and kind == XEN_ELFNOTE_PHYS32_ENTRY for name, kind in _elf_notes(elf))


def module_depends(ko: bytes) -> list[str]:
    """Module names listed in the ``depends=`` entry of a kernel module's ``.modinfo`` strings."""
    marker = b"\0depends="
    at = ko.find(marker)
    if at == -1:
        raise KernelError("kernel module without a depends= entry")
    value = ko[at + len(marker) : ko.index(b"\0", at + 1)].decode()
    return [name for name in value.split(",") if name]


def load_order(wanted: Iterable[str], modules: Mapping[str, bytes]) -> list[str]:
    """The modules ``wanted`` plus everything they depend on, each after its dependencies.

    ``modules`` maps module names (``virtio_blk``) to their ``.ko`` bytes.
    """
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise KernelError(f"module dependency cycle through {name}")
        if name not in modules:
            raise KernelError(f"kernel module {name} is not in the kernel package")
        visiting.add(name)
        for dependency in module_depends(modules[name]):
            visit(dependency)
        visiting.discard(name)
        order.append(name)

    for name in wanted:
        visit(name)
    return order
