"""The content-addressed image store on the control host: one file per image, named by its sha256.

No path in the store comes from a user: a name is the 64 lowercase hex digits of the file's sha256,
and a file being received lives in the store's hidden ``.partial`` area under the image's id until it
is verified and moved (one rename, same filesystem) to its content address. Two images with the same
content share one file.

Locks are ``flock`` locks on files of the store's hidden ``.locks`` area: every process that writes
the store runs on the control host that holds it (web, control worker, ``manage.py``), whatever the
database, and a process that dies frees its locks.
"""

import fcntl
import hashlib
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from apps.core.conf import novacron_setting

_SHA256 = re.compile(r"[0-9a-f]{64}")
PARTIAL_DIR = ".partial"
LOCKS_DIR = ".locks"
HASH_CHUNK = 1 << 20


def store_dir() -> Path:
    return Path(novacron_setting("IMAGE_STORE_DIR"))


def store_path(sha256: str) -> Path:
    """Where the store keeps the image whose sha256 is ``sha256``; ValueError for anything else."""
    if not _SHA256.fullmatch(sha256):
        raise ValueError(f"not a sha256 in lowercase hex: {sha256!r}")
    return store_dir() / sha256


def partial_path(image_id: int) -> Path:
    """Where the file of image ``image_id`` is received (created with its directory on demand)."""
    return store_dir() / PARTIAL_DIR / str(int(image_id))


def held_bytes(image_id: int) -> int:
    """How many bytes of image ``image_id``'s file the store holds so far (0: none)."""
    try:
        return partial_path(image_id).stat().st_size
    except FileNotFoundError:
        return 0


def discard_partial(image_id: int) -> None:
    partial_path(image_id).unlink(missing_ok=True)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def keep(image_id: int, sha256: str) -> Path:
    """Move image ``image_id``'s verified partial file to its content address; when the store
    already holds that content the partial file is dropped (one file per content)."""
    target = store_path(sha256)
    partial = partial_path(image_id)
    if target.exists():
        partial.unlink()
    else:
        partial.chmod(0o644)
        os.replace(partial, target)
    return target


def is_valid_sha256(value: str) -> bool:
    return bool(_SHA256.fullmatch(value))


@contextmanager
def store_lock(name: str, *, wait: bool) -> Iterator[bool]:
    """Hold the store's lock ``name`` for the block; yields whether it is held (``wait=False`` yields
    False at once when another process, or another open of this one, holds it)."""
    directory = store_dir() / LOCKS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(directory / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(descriptor)  # closing the last descriptor of the open file releases its lock
