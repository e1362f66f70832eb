"""How many streams this process holds, in all and per user (``STREAMS_MAX_PER_PROCESS``,
``STREAMS_MAX_PER_USER``), and how many consoles per user and per VM (``CONSOLE_MAX_PER_USER``,
``CONSOLE_MAX_PER_VM``). Invariant: a slot is taken before a stream starts and given back when it
ends, whatever ends it; a refusal is a 429 with a message (``access.Refused``)."""

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from django.conf import settings

from .access import Refused

_open: Counter[int] = Counter()
_consoles_by_user: Counter[int] = Counter()
_consoles_by_vm: Counter[str] = Counter()


def open_count() -> int:
    return sum(_open.values())


def check_process() -> None:
    """:class:`Refused` (429) when this process holds its most streams (checked first, cheaply)."""
    if open_count() >= settings.STREAMS_MAX_PER_PROCESS:
        raise Refused(429, "Too many open streams on this server; try again shortly.")


@contextmanager
def slot(user_id: int) -> Iterator[None]:
    """Hold one stream's place for ``user_id``; :class:`Refused` (429) when a limit is reached."""
    check_process()
    if _open[user_id] >= settings.STREAMS_MAX_PER_USER:
        raise Refused(
            429,
            f"You have {_open[user_id]} streams open, the most allowed; close one before opening another.",
        )
    _open[user_id] += 1
    try:
        yield
    finally:
        _open[user_id] -= 1
        if not _open[user_id]:
            del _open[user_id]


@contextmanager
def console_slot(user_id: int, vm_id: str) -> Iterator[None]:
    """Hold one console's place for ``user_id`` on ``vm_id``; :class:`Refused` (429) beyond the limits."""
    if _consoles_by_user[user_id] >= settings.CONSOLE_MAX_PER_USER:
        raise Refused(429, f"You have {_consoles_by_user[user_id]} consoles open, the most allowed.")
    if _consoles_by_vm[vm_id] >= settings.CONSOLE_MAX_PER_VM:
        raise Refused(429, f"This VM has {_consoles_by_vm[vm_id]} consoles open, the most allowed.")
    _consoles_by_user[user_id] += 1
    _consoles_by_vm[vm_id] += 1
    try:
        yield
    finally:
        _consoles_by_user[user_id] -= 1
        if not _consoles_by_user[user_id]:
            del _consoles_by_user[user_id]
        _consoles_by_vm[vm_id] -= 1
        if not _consoles_by_vm[vm_id]:
            del _consoles_by_vm[vm_id]
