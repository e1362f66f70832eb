"""Writer for the "newc" (SVR4, no CRC) cpio format that the Linux kernel unpacks as an initramfs.

Each entry is a 110-byte ASCII header (magic ``070701`` followed by thirteen 8-digit hex fields), the
NUL-terminated path, padding to a 4-byte boundary, the file data and padding again; the archive ends with
an entry named ``TRAILER!!!``. Timestamps and owners are fixed so the same inputs give the same bytes.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass

MAGIC = b"070701"
TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class Entry:
    """One archive member; ``path`` has no leading slash (``bin/busybox``)."""

    path: str
    mode: int
    data: bytes = b""
    rdev_major: int = 0
    rdev_minor: int = 0


def directory(path: str, perm: int = 0o755) -> Entry:
    """A directory entry."""
    return Entry(path, stat.S_IFDIR | perm)


def regular(path: str, data: bytes, perm: int = 0o644) -> Entry:
    """A regular file entry holding ``data``."""
    return Entry(path, stat.S_IFREG | perm, data)


def symlink(path: str, target: str) -> Entry:
    """A symbolic link; its data is the link target."""
    return Entry(path, stat.S_IFLNK | 0o777, target.encode())


def char_device(path: str, major: int, minor: int, perm: int = 0o600) -> Entry:
    """A character device node (e.g. ``dev/console`` = 5:1)."""
    return Entry(path, stat.S_IFCHR | perm, rdev_major=major, rdev_minor=minor)


def _pad(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _member(ino: int, entry: Entry, mtime: int) -> bytes:
    name = entry.path.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(entry.mode) else 1
    fields = (
        ino,
        entry.mode,
        0,  # uid
        0,  # gid
        nlink,
        mtime,
        len(entry.data),
        0,  # devmajor
        0,  # devminor
        entry.rdev_major,
        entry.rdev_minor,
        len(name),
        0,  # check (unused by newc)
    )
    header = MAGIC + b"".join(b"%08X" % value for value in fields)
    head = header + name
    return head + _pad(len(head)) + entry.data + _pad(len(entry.data))


def archive(entries: list[Entry], mtime: int = 0) -> bytes:
    """The complete newc archive of ``entries`` (in the given order) with its trailer."""
    seen: set[str] = set()
    parts: list[bytes] = []
    for ino, entry in enumerate(entries, start=1):
        if entry.path in seen or entry.path.startswith("/") or not entry.path:
            raise ValueError(f"bad or duplicate cpio path: {entry.path!r}")
        seen.add(entry.path)
        parts.append(_member(ino, entry, mtime))
    parts.append(_member(0, Entry(TRAILER, 0), 0))
    return b"".join(parts)
