"""The ``mixed`` data set of bench-dwcp: this machine's shared libraries and shared data, concatenated.

What a data disk really holds, unlike the mostly-sparse VM image: ELF shared objects
(``*.so``, ``*.so.N`` under ``/usr/lib``) and everything under ``/usr/share`` (documentation,
locales, icons, already-compressed ``.gz`` files), read as they are. Invariants:

* deterministic: each tree's regular files (no symlinks) are sorted by path; the next file comes
  from whichever tree has contributed fewer bytes so far, so the set is about half each and
  interleaved; the same machine always gives the same bytes;
* exactly ``size`` bytes: the last file is cut, and the file list starts over only if both trees
  together are smaller than ``size``;
* comparable: the manifest holds the sha256 of the list (one ``path<TAB>size`` line per file used,
  in order, repeats included) and of the bytes, so two runs can tell whether they moved the same data.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

LIBRARY_ROOT = Path("/usr/lib")
SHARED_DATA_ROOT = Path("/usr/share")
_SHARED_OBJECT = re.compile(r"\.so(\.\d+)*$")
_BLOCK = 1024 * 1024


@dataclass(frozen=True)
class Manifest:
    """What a ``mixed`` file was made of."""

    size: int
    files: int  # file reads, repeats included
    distinct_files: int
    list_sha256: str
    data_sha256: str
    repeated: bool  # the list had to start over to reach the size


def _regular_files(root: Path, wanted: re.Pattern[str] | None) -> list[tuple[Path, int]]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for filename in filenames:
            if wanted is not None and not wanted.search(filename):
                continue
            path = Path(dirpath) / filename
            try:
                stat = path.lstat()
            except OSError:
                continue
            if path.is_symlink() or not path.is_file() or stat.st_size == 0 or not os.access(path, os.R_OK):
                continue
            found.append((path, stat.st_size))
    found.sort()
    return found


def interleave(trees: Sequence[list[tuple[Path, int]]]) -> Iterator[tuple[Path, int]]:
    """Files of all trees, each next one from the tree that has contributed fewest bytes so far."""
    positions = [0] * len(trees)
    taken = [0] * len(trees)
    while True:
        open_trees = [i for i, tree in enumerate(trees) if positions[i] < len(tree)]
        if not open_trees:
            return
        tree = min(open_trees, key=lambda i: (taken[i], i))
        path, length = trees[tree][positions[tree]]
        positions[tree] += 1
        taken[tree] += length
        yield path, length


def make_mixed(
    path: Path,
    size: int,
    roots: Sequence[tuple[Path, re.Pattern[str] | None]] = (
        (LIBRARY_ROOT, _SHARED_OBJECT),
        (SHARED_DATA_ROOT, None),
    ),
) -> Manifest:
    """Write ``size`` bytes of the roots' files to ``path``; ``roots`` pairs a tree with a name filter."""
    if size <= 0:
        raise ValueError("the mixed data set needs a positive size")
    order = list(interleave([_regular_files(root, pattern) for root, pattern in roots]))
    if not order:
        raise ValueError(f"no readable files under {', '.join(str(root) for root, _ in roots)}")
    listing = hashlib.sha256()
    content = hashlib.sha256()
    written = reads = pass_start = 0
    used: set[Path] = set()
    with path.open("wb") as output:
        while written < size:
            if reads and reads % len(order) == 0:
                if written == pass_start:
                    raise ValueError("the listed files could not be read: nothing written in a whole pass")
                pass_start = written
            origin, _ = order[reads % len(order)]
            reads += 1
            with origin.open("rb") as source:
                taken = 0
                while written < size and (block := source.read(min(_BLOCK, size - written))):
                    output.write(block)
                    content.update(block)
                    written += len(block)
                    taken += len(block)
            if taken:
                listing.update(f"{origin}\t{taken}\n".encode())
                used.add(origin)
    return Manifest(
        size=written,
        files=reads,
        distinct_files=len(used),
        list_sha256=listing.hexdigest(),
        data_sha256=content.hexdigest(),
        repeated=reads > len(order),
    )
