"""Unit tests of the newc cpio writer and the kernel helpers (vmlinux extraction, PVH note, module order)."""

import lzma
import stat
import struct

import pytest

from workers.guest import cpio
from workers.guest.kernel import (
    XEN_ELFNOTE_PHYS32_ENTRY,
    KernelError,
    extract_vmlinux,
    has_pvh_entry,
    load_order,
    module_depends,
)


def parse_newc(data: bytes) -> list[tuple[str, int, bytes, int, int]]:
    """(path, mode, data, rdev major, rdev minor) of each member, checking the format as it goes."""
    members: list[tuple[str, int, bytes, int, int]] = []
    pos = 0
    while True:
        assert pos % 4 == 0
        assert data[pos : pos + 6] == b"070701"
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, rdevmajor, rdevminor, namesize = (
            fields[1],
            fields[6],
            fields[9],
            fields[10],
            fields[11],
        )
        name_start = pos + 110
        name = data[name_start : name_start + namesize]
        assert name.endswith(b"\0")
        data_start = name_start + namesize + (-(110 + namesize) % 4)
        body = data[data_start : data_start + filesize]
        pos = data_start + filesize + (-filesize % 4)
        path = name[:-1].decode()
        if path == "TRAILER!!!":
            assert pos == len(data)
            return members
        members.append((path, mode, body, rdevmajor, rdevminor))


def test_newc_archive_round_trips():
    entries = [
        cpio.directory("bin"),
        cpio.regular("bin/tool", b"abcde", perm=0o755),
        cpio.symlink("bin/sh", "tool"),
        cpio.char_device("dev/console", 5, 1),
        cpio.regular("empty", b""),
    ]
    members = parse_newc(cpio.archive(entries))
    assert [m[0] for m in members] == ["bin", "bin/tool", "bin/sh", "dev/console", "empty"]
    assert stat.S_ISDIR(members[0][1])
    assert members[1][1] == stat.S_IFREG | 0o755 and members[1][2] == b"abcde"
    assert stat.S_ISLNK(members[2][1]) and members[2][2] == b"tool"
    assert stat.S_ISCHR(members[3][1]) and members[3][3:] == (5, 1)


def test_newc_archive_is_deterministic_and_rejects_bad_paths():
    entries = [cpio.regular("a", b"x")]
    assert cpio.archive(entries) == cpio.archive(entries)
    with pytest.raises(ValueError):
        cpio.archive([cpio.regular("a", b"1"), cpio.regular("a", b"2")])
    with pytest.raises(ValueError):
        cpio.archive([cpio.regular("/abs", b"1")])


def elf_with_notes(notes: list[tuple[bytes, int]]) -> bytes:
    """A minimal little-endian ELF64 file with one PT_NOTE segment holding ``notes``."""
    blob = b""
    for name, kind in notes:
        owner = name + b"\0"
        desc = b"\x00" * 8
        blob += struct.pack("<III", len(owner), len(desc), kind)
        blob += owner + b"\0" * (-len(owner) % 4) + desc
    phoff = 64
    notes_offset = phoff + 56
    header = b"\x7fELF" + bytes([2, 1, 1]) + b"\0" * 9
    header += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0, phoff, 0, 0, 64, 56, 1, 64, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 4, 4, notes_offset, 0, 0, len(blob), len(blob), 4)
    return header + phdr + blob


def test_pvh_note_detection():
    assert has_pvh_entry(elf_with_notes([(b"GNU", 3), (b"Xen", XEN_ELFNOTE_PHYS32_ENTRY)]))
    assert not has_pvh_entry(elf_with_notes([(b"Xen", 5), (b"GNU", XEN_ELFNOTE_PHYS32_ENTRY)]))
    with pytest.raises(KernelError):
        has_pvh_entry(b"MZ not an elf")


def test_extract_vmlinux_skips_false_magic():
    elf = elf_with_notes([(b"Xen", XEN_ELFNOTE_PHYS32_ENTRY)]) + bytes(range(256)) * 64
    payload = lzma.compress(elf, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    # A stray XZ magic before the real stream, and trailing data after it, as in a bzImage.
    bzimage = b"MZ" + b"\0" * 100 + b"\xfd7zXZ\x00garbage" + b"\0" * 50 + payload + b"\x12\x34\x56\x78"
    assert extract_vmlinux(bzimage) == elf
    with pytest.raises(KernelError):
        extract_vmlinux(b"MZ" + b"\0" * 100)


def fake_module(depends: str) -> bytes:
    return b"\x7fELF....\0license=GPL\0depends=" + depends.encode() + b"\0name=x\0"


def test_module_load_order_puts_dependencies_first():
    modules = {
        "blk": fake_module("core,ring"),
        "pci": fake_module("ring,core,legacy"),
        "core": fake_module("ring"),
        "ring": fake_module(""),
        "legacy": fake_module(""),
    }
    assert module_depends(modules["pci"]) == ["ring", "core", "legacy"]
    order = load_order(["pci", "blk"], modules)
    assert sorted(order) == ["blk", "core", "legacy", "pci", "ring"]
    for name in order:
        for dependency in module_depends(modules[name]):
            assert order.index(dependency) < order.index(name)
    with pytest.raises(KernelError):
        load_order(["missing"], modules)
    with pytest.raises(KernelError):
        load_order(["a"], {"a": fake_module("b"), "b": fake_module("a")})
