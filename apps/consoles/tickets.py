"""Console tickets: what ``POST /api/v1/vms/{id}/console/`` hands out and the WebSocket consumes.

A ticket is 32 random bytes from ``secrets``, shown to the client once; Redis keeps only its SHA-256
(``novacron:console:ticket:<hex>``) with the user and VM it was issued for and its expiry, valid for
``TICKET_TTL_SECONDS``. Consuming is one ``GETDEL``: a ticket opens at most one console, even with
connects racing. So that a refusal can say why, the entry outlives its validity (``KEPT_SECONDS``:
"expired") and a consumed ticket leaves a marker as long ("already used"); anything else is unknown.
"""

import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from typing import Final

import redis.asyncio as aioredis
from django_redis import get_redis_connection

TICKET_TTL_SECONDS: Final = 30
TICKET_BYTES: Final = 32
KEPT_SECONDS: Final = 300
KEY: Final = "novacron:console:ticket:{digest}"
USED_KEY: Final = "novacron:console:used:{digest}"
MAX_TICKET_LENGTH: Final = 128  # a real one is 43 characters; longer is not looked up


@dataclass(frozen=True)
class TicketClaims:
    """Whom a ticket was issued to, for which VM."""

    user_id: int
    vm_id: str


class TicketRefused(Exception):
    """The ticket opens nothing; the message says why (unknown, expired, already used)."""


def _digest(ticket: str) -> str:
    return hashlib.sha256(ticket.encode()).hexdigest()


def ticket_issue(*, user_id: int, vm_id: str) -> str:
    """A new single-use ticket for ``user_id`` to open VM ``vm_id``'s console."""
    ticket = secrets.token_urlsafe(TICKET_BYTES)
    claims = json.dumps({"user_id": user_id, "vm_id": vm_id, "expires": time.time() + TICKET_TTL_SECONDS})
    get_redis_connection("default").set(KEY.format(digest=_digest(ticket)), claims, ex=KEPT_SECONDS)
    return ticket


async def ticket_consume(client: aioredis.Redis, ticket: str) -> TicketClaims:
    """The ticket's claims, using it up; :class:`TicketRefused` when it opens nothing."""
    if not ticket or len(ticket) > MAX_TICKET_LENGTH:
        raise TicketRefused("no ticket, or not one issued by this service")
    digest = _digest(ticket)
    raw = await client.getdel(KEY.format(digest=digest))
    if raw is None:
        if await client.exists(USED_KEY.format(digest=digest)):
            raise TicketRefused("the ticket was already used; ask for a new one")
        raise TicketRefused("unknown ticket (never issued here, or expired long ago)")
    await client.set(USED_KEY.format(digest=digest), b"1", ex=KEPT_SECONDS)
    claims = json.loads(raw)
    if float(claims["expires"]) < time.time():
        raise TicketRefused(f"the ticket expired (valid {TICKET_TTL_SECONDS} s); ask for a new one")
    return TicketClaims(user_id=int(claims["user_id"]), vm_id=str(claims["vm_id"]))
