"""``/api/v1/vms/{id}/console/stream/?ticket=...`` on the streams service: a VM's serial console as a
WebSocket (protocol: docs/console.md).

The ticket of ``POST /api/v1/vms/{id}/console/`` is the credential: consumed once (4401 when it is
unknown, expired, used or for another VM), then the user must still be active and within the console
limits (4429). Bytes go both ways through :class:`apps.consoles.link.ConsoleLink` (DWCP to the VM's
node, across live migrations); binary messages out are console output, text messages JSON status
events; every message in is input for the guest, at most ``MAX_INPUT_BYTES`` (1009 beyond). Before
the server closes it sends ``{"event": "closed", "reason": ...}``. Invariants as every stream here:
no database connection while open (reads at open and when relocating the VM, in Django's thread), no
thread of Django's pool held.
"""

import asyncio
import contextlib
import json
import logging
from typing import Final
from urllib.parse import parse_qs

from channels.generic.websocket import AsyncWebsocketConsumer
from django.contrib.auth import get_user_model

from apps.consoles.link import ConsoleEvent, ConsoleLink, Ending
from apps.consoles.tickets import TicketRefused, ticket_consume

from . import hub, limits
from .access import Refused, briefly

logger = logging.getLogger(__name__)

# Input per message: a terminal sends keystrokes and pastes; 4 KiB is a large paste at a UART's pace.
MAX_INPUT_BYTES: Final = 4096
CLOSE_TOO_BIG: Final = 1009
CLOSE_BAD_TICKET: Final = 4401
CLOSE_TOO_MANY: Final = 4429
CLOSE_SERVER_ERROR: Final = 1011
MAX_REASON_BYTES: Final = 123  # RFC 6455: a close frame's reason fits in 125 bytes with its code


def _user_active(user_id: int) -> bool:
    return get_user_model().objects.filter(pk=user_id, is_active=True).exists()


class ConsoleConsumer(AsyncWebsocketConsumer):
    """One viewer of one VM's console."""

    async def connect(self) -> None:
        self._link: ConsoleLink | None = None
        self._ended = False
        await self.accept()
        self._task = asyncio.create_task(self._serve(), name="console")

    async def disconnect(self, code: int) -> None:
        self._ended = True
        task = getattr(self, "_task", None)
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        data = bytes_data if bytes_data is not None else (text_data or "").encode()
        if len(data) > MAX_INPUT_BYTES:
            await self._end(
                CLOSE_TOO_BIG, f"an input message may hold {MAX_INPUT_BYTES} bytes, not {len(data)}"
            )
            return
        if self._link is not None and data:
            await self._link.send(data)

    async def _serve(self) -> None:
        vm_id = str(self.scope["url_route"]["kwargs"]["vm_id"])
        try:
            ending = await self._admit_and_run(vm_id)
        except Exception:  # Redis or the database failing: the viewer is told, not left hanging
            logger.exception("console of VM %s failed", vm_id)
            ending = Ending(CLOSE_SERVER_ERROR, "the console failed on the server; try again")
        finally:
            self._link = None
        await self._end(ending.code, ending.reason)

    async def _admit_and_run(self, vm_id: str) -> Ending:
        query = parse_qs(self.scope.get("query_string", b"").decode("latin-1"))
        ticket = (query.get("ticket") or [""])[0]
        try:
            claims = await ticket_consume(hub.redis_client(), ticket)
        except TicketRefused as refused:
            return Ending(CLOSE_BAD_TICKET, str(refused))
        if claims.vm_id != vm_id:
            return Ending(CLOSE_BAD_TICKET, "the ticket is for another VM")
        if not await briefly(_user_active, claims.user_id):
            return Ending(CLOSE_BAD_TICKET, "the ticket's user is no longer active")
        try:
            with limits.slot(claims.user_id), limits.console_slot(claims.user_id, vm_id):
                self._link = ConsoleLink(vm_id, output=self._output, event=self._event)
                return await self._link.run()
        except Refused as refused:
            return Ending(CLOSE_TOO_MANY, refused.detail)

    async def _output(self, data: bytes) -> None:
        if not self._ended:
            await self.send(bytes_data=data)

    async def _event(self, event: ConsoleEvent) -> None:
        if not self._ended:
            await self.send(text_data=json.dumps(event))

    async def _end(self, code: int, reason: str) -> None:
        """Tell the viewer why, then close with ``code`` (once)."""
        if self._ended:
            return
        self._ended = True
        task = getattr(self, "_task", None)
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel()
        with contextlib.suppress(OSError):
            closed: ConsoleEvent = {"event": "closed", "reason": reason}
            await self.send(text_data=json.dumps(closed))
            short = reason.encode()[:MAX_REASON_BYTES].decode(errors="ignore")
            await self.close(code=code, reason=short)


class NoSuchStream(AsyncWebsocketConsumer):
    """Any other WebSocket path: the handshake is refused (HTTP 403)."""

    async def connect(self) -> None:
        await self.close()
