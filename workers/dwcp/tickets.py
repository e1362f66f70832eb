"""Transfer tickets: short-lived, HMAC-SHA256-signed permissions for one transfer.

The control plane (or the CLI, for operator use) signs a ticket naming the transfer id, the source
and destination nodes, the kind (``file``, ``tunnel`` or ``console``: a viewer of the serial console
of the VM whose uuid is the target), the target and an expiry; the receiving
node verifies it before touching its disk or sockets. Pure Python, no Django: the control plane
imports ``sign_ticket`` directly and passes ``settings.DWCP["SECRET"]``.

Token format: ``base64url(json) "." base64url(hmac_sha256(secret, "dwcp-ticket/1." + base64url(json)))``.
A receiver refuses a ticket that is forged (bad MAC or malformed), expired, valid for longer than
``MAX_TICKET_LIFETIME_SECONDS``, addressed to another node, or already used (``ReplayGuard``
remembers every accepted transfer id until its expiry).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Final, Literal

from . import limits
from .errors import TicketError

logger = logging.getLogger(__name__)

TICKET_VERSION: Final = 1
SIGNING_LABEL: Final = b"dwcp-ticket/1."
TransferKind = Literal["file", "tunnel", "console"]
KINDS: Final = ("file", "tunnel", "console")


@dataclass(frozen=True, slots=True)
class Ticket:
    transfer_id: str
    source_node: str
    dest_node: str
    kind: TransferKind
    target: str
    expires_at: float  # unix seconds


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: bytes, body: str) -> bytes:
    return hmac.new(secret, SIGNING_LABEL + body.encode("ascii"), hashlib.sha256).digest()


def secret_bytes(secret: str | bytes) -> bytes:
    value = secret.encode() if isinstance(secret, str) else secret
    if len(value) < 16:
        raise TicketError("weak_secret", "DWCP_SECRET must be at least 16 bytes")
    return value


def sign_ticket(
    *,
    secret: str | bytes,
    source_node: str,
    dest_node: str,
    kind: TransferKind,
    target: str,
    transfer_id: str | None = None,
    ttl_seconds: float = limits.DEFAULT_TICKET_TTL_SECONDS,
    now: float | None = None,
) -> str:
    """Return a signed ticket token for one transfer (a fresh uuid4 id unless one is given)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    if not 0 < ttl_seconds <= limits.MAX_TICKET_LIFETIME_SECONDS:
        raise ValueError(f"ttl_seconds must be in (0, {limits.MAX_TICKET_LIFETIME_SECONDS}]")
    for name, value in (("source_node", source_node), ("dest_node", dest_node)):
        if not value or len(value) > limits.MAX_NAME_LENGTH:
            raise ValueError(f"{name} must be 1..{limits.MAX_NAME_LENGTH} characters")
    if not target or len(target) > limits.MAX_TARGET_LENGTH:
        raise ValueError(f"target must be 1..{limits.MAX_TARGET_LENGTH} characters")
    issued = time.time() if now is None else now
    claims = {
        "v": TICKET_VERSION,
        "tid": transfer_id or str(uuid.uuid4()),
        "src": source_node,
        "dst": dest_node,
        "kind": kind,
        "target": target,
        "exp": round(issued + ttl_seconds, 3),
    }
    body = _b64encode(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
    return f"{body}.{_b64encode(_mac(secret_bytes(secret), body))}"


def _claim(claims: dict[str, Any], key: str, max_length: int) -> str:
    value = claims.get(key)
    if not isinstance(value, str) or not 0 < len(value) <= max_length:
        raise TicketError("malformed", f"claim {key!r} missing or invalid")
    return value


def verify_ticket(
    token: str,
    *,
    secret: str | bytes,
    node_name: str,
    replay_guard: ReplayGuard | None = None,
    now: float | None = None,
) -> Ticket:
    """Check ``token`` for the node ``node_name``; raise ``TicketError`` (and log why) if refused.

    With a ``replay_guard`` the transfer id is also recorded, so the same ticket is refused next time.
    """
    try:
        ticket = _verify(token, secret_bytes(secret), node_name, now)
        if replay_guard is not None:
            replay_guard.claim(ticket)
    except TicketError as exc:
        logger.warning("DWCP ticket refused on node %s: %s", node_name, exc)
        raise
    return ticket


def _verify(token: str, secret: bytes, node_name: str, now: float | None) -> Ticket:
    if not isinstance(token, str) or len(token) > limits.MAX_TICKET_LENGTH or token.count(".") != 1:
        raise TicketError("malformed", "not a DWCP ticket")
    body, signature = token.split(".")
    try:
        given_mac = _b64decode(signature)
        raw = _b64decode(body)
    except (binascii.Error, ValueError):
        raise TicketError("malformed", "ticket is not base64url") from None
    if not hmac.compare_digest(given_mac, _mac(secret, body)):
        raise TicketError("forged", "signature does not match the shared secret")
    try:
        claims = json.loads(raw)
    except ValueError:
        raise TicketError("malformed", "ticket body is not JSON") from None
    if not isinstance(claims, dict) or claims.get("v") != TICKET_VERSION:
        raise TicketError("malformed", "unknown ticket version")
    expires_at = claims.get("exp")
    if not isinstance(expires_at, int | float) or isinstance(expires_at, bool):
        raise TicketError("malformed", "claim 'exp' missing or invalid")
    kind = claims.get("kind")
    if kind not in KINDS:
        raise TicketError("malformed", f"claim 'kind' must be one of {', '.join(KINDS)}")
    ticket = Ticket(
        transfer_id=_claim(claims, "tid", limits.MAX_NAME_LENGTH),
        source_node=_claim(claims, "src", limits.MAX_NAME_LENGTH),
        dest_node=_claim(claims, "dst", limits.MAX_NAME_LENGTH),
        kind=kind,
        target=_claim(claims, "target", limits.MAX_TARGET_LENGTH),
        expires_at=float(expires_at),
    )
    current = time.time() if now is None else now
    if ticket.expires_at + limits.TICKET_CLOCK_SKEW_SECONDS < current:
        raise TicketError("expired", f"ticket {ticket.transfer_id} expired at {ticket.expires_at:.0f}")
    horizon = current + limits.MAX_TICKET_LIFETIME_SECONDS + limits.TICKET_CLOCK_SKEW_SECONDS
    if ticket.expires_at > horizon:
        raise TicketError("too_long", f"ticket {ticket.transfer_id} is valid for longer than allowed")
    if ticket.dest_node != node_name:
        raise TicketError("wrong_node", f"ticket is for node {ticket.dest_node!r}, this is {node_name!r}")
    return ticket


class ReplayGuard:
    """Remembers accepted transfer ids until their tickets expire; a second use is refused."""

    def __init__(self) -> None:
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def claim(self, ticket: Ticket, *, now: float | None = None) -> None:
        current = time.time() if now is None else now
        with self._lock:
            self._forget_expired(current)
            if ticket.transfer_id in self._seen:
                raise TicketError("replayed", f"ticket for transfer {ticket.transfer_id} was already used")
            self._seen[ticket.transfer_id] = ticket.expires_at + limits.TICKET_CLOCK_SKEW_SECONDS

    def _forget_expired(self, current: float) -> None:
        expired = [tid for tid, until in self._seen.items() if until < current]
        for tid in expired:
            del self._seen[tid]

    def __len__(self) -> int:
        with self._lock:
            return len(self._seen)


def peek_ticket(token: str) -> Ticket:
    """Read a ticket's claims WITHOUT verifying it: only for labelling (progress keys, logs)."""
    try:
        body = token.split(".", maxsplit=1)[0]
        claims = json.loads(_b64decode(body))
        return Ticket(
            transfer_id=_claim(claims, "tid", limits.MAX_NAME_LENGTH),
            source_node=_claim(claims, "src", limits.MAX_NAME_LENGTH),
            dest_node=_claim(claims, "dst", limits.MAX_NAME_LENGTH),
            kind=claims["kind"],
            target=_claim(claims, "target", limits.MAX_TARGET_LENGTH),
            expires_at=float(claims["exp"]),
        )
    except (AttributeError, KeyError, TypeError, ValueError, binascii.Error):
        raise TicketError("malformed", "not a DWCP ticket") from None
