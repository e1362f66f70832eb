"""The node worker's malloc arenas, capped so that its memory stays flat under endless migrations.

Every DWCP connection, tunnel and transfer runs on threads of its own (``workers.dwcp.transport``
says why threads), started and ended with each migration, and their frame buffers (tens of KiB, past
pymalloc's 512 bytes) come from glibc's malloc. glibc gives threads up to eight arenas per core; each
arena keeps what its threads freed, and which arena a new thread lands on shifts as migrations come
and go, so the worker's RSS crept up for as long as migrations ran while its Python objects stayed
level (the soak in ``docs/performance.md``). Two arenas bound it and cost nothing measurable here.

Applied once at start, before the worker starts a thread. An operator's ``MALLOC_ARENA_MAX`` (which
glibc reads itself) is left alone; a C library other than glibc (musl) has no such arenas.
"""

import ctypes
import os
from collections.abc import Mapping
from typing import Final

ARENAS: Final = 2
M_ARENA_MAX: Final = -8  # glibc's <malloc.h>


def glibc() -> bool:
    """Whether this process runs on glibc (the only C library with per-thread arenas to cap)."""
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError):  # a C library that does not know the name
        return False


def cap_malloc_arenas(arenas: int = ARENAS, environ: Mapping[str, str] = os.environ) -> bool:
    """Let glibc's malloc use at most ``arenas`` arenas from now on; False if it is not glibc or
    ``MALLOC_ARENA_MAX`` is set (the operator's choice stands)."""
    if arenas < 1:
        raise ValueError(f"arenas must be at least 1, not {arenas}")
    if "MALLOC_ARENA_MAX" in environ or not glibc():
        return False
    libc = ctypes.CDLL(None)  # the C library this process already runs on
    return bool(libc.mallopt(M_ARENA_MAX, arenas))
