"""How many streams this process holds, in all and per user (``STREAMS_MAX_PER_PROCESS``,
``STREAMS_MAX_PER_USER``). Invariant: a slot is taken before a stream starts and given back when it
ends, whatever ends it; a refusal is a 429 with a message (``access.Refused``)."""

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from django.conf import settings

from .access import Refused

_open: Counter[int] = Counter()


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
