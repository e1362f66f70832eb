"""The content-addressed image store on the control host: one file per image, named by its sha256.

No path in the store comes from a user: a name is the 64 lowercase hex digits of the file's sha256.
"""

import re
from pathlib import Path

from apps.core.conf import novacron_setting

_SHA256 = re.compile(r"[0-9a-f]{64}")


def store_dir() -> Path:
    return Path(novacron_setting("IMAGE_STORE_DIR"))


def store_path(sha256: str) -> Path:
    """Where the store keeps the image whose sha256 is ``sha256``; ValueError for anything else."""
    if not _SHA256.fullmatch(sha256):
        raise ValueError(f"not a sha256 in lowercase hex: {sha256!r}")
    return store_dir() / sha256
