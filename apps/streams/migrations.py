"""``GET /api/v1/migrations/{id}/events/`` on the streams service: a migration's progress as SSE.

On connect: the caller and the migration are checked as the REST API checks them (401, 404 for
another project's migration), then the current state goes out as a ``progress`` event (the REST
API's migration object), then each change: the source node's progress snapshots and the control
side's status changes, both from the migration's Redis channel, each as a full ``progress`` object;
``end`` when it finishes (a finished migration: its final state, then ``end``). Keepalive comments
every ``STREAMS_KEEPALIVE_SECONDS``; the stream closes after ``STREAMS_MAX_SECONDS`` and the client
reconnects.

Event ids are ``<history>-<updated>``: the id of the migration's latest recorded event and the
source's last progress stamp (ms). A client reconnecting with the current id as ``Last-Event-ID``
is not sent the state it already has. Invariant: no database connection is held while waiting; the
row is read at connect, after a lost Redis connection and once more at the end (final figures).
"""

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from rest_framework.request import Request

from apps.migrations import progress as live
from apps.migrations.choices import TERMINAL_STATUSES
from apps.migrations.models import Migration
from apps.migrations.selectors import migration_visible
from apps.migrations.serializers import MigrationSerializer, progress_view
from apps.projects.acting import viewer
from workers import contract

from . import access, hub, limits, sse


@dataclass
class State:
    """What the client was last sent: the migration (in memory, no connection) and its progress."""

    migration: Migration
    snapshot: dict[str, Any]
    history: int
    updated_ms: int

    @property
    def event_id(self) -> str:
        return f"{self.history}-{self.updated_ms}"

    @property
    def ended(self) -> bool:
        return self.migration.status in TERMINAL_STATUSES


def _updated_ms(current: dict[str, Any]) -> int:
    return int(float(current.get("updated", 0)) * 1000)


def _reader(migration_id: uuid.UUID, current: dict[str, Any]) -> Any:
    """The read run in Django's thread: the migration as the caller sees it, with ``current``
    (the progress hash, read before) as its live figures."""

    def read(request: Request) -> State:
        found = migration_visible(viewer=viewer(request)).filter(pk=migration_id).first()
        if found is None:
            raise access.Refused(404, "Not found.")
        return _state(found, current)

    return read


def _state(migration: Migration, current: dict[str, Any]) -> State:
    context = {"progress": {migration.pk: progress_view(migration, current)}}
    snapshot = dict(MigrationSerializer(migration, context=context).data)
    history = migration.events.order_by("-pk").values_list("pk", flat=True).first() or 0
    return State(migration, json.loads(json.dumps(snapshot, default=str)), history, _updated_ms(current))


class MigrationEventsConsumer(sse.EventStreamConsumer):
    async def stream(self, cors: list[tuple[bytes, bytes]]) -> None:
        try:
            migration_id = uuid.UUID(self.scope["url_route"]["kwargs"]["migration_id"])
        except ValueError:
            raise access.Refused(404, "Not found.") from None
        limits.check_process()  # before any work for a stream this process would refuse anyway
        events = hub.hub()
        subscription = await events.subscribe(contract.MIGRATION_EVENTS_CHANNEL.format(id=migration_id))
        try:  # subscribed before the state is read: nothing falls between the two
            current = await self._progress(migration_id)
            opened = await access.opened(self.scope, _reader(migration_id, current))
            with limits.slot(opened.user_id):
                await self._run(opened.data, subscription, cors)
        finally:
            await events.unsubscribe(subscription)

    async def _progress(self, migration_id: uuid.UUID) -> dict[str, Any]:
        raw = await hub.redis_client().hgetall(contract.MIGRATION_PROGRESS_KEY.format(id=migration_id))
        return live.parse(raw)

    async def _reread(self, state: State) -> State:
        """The row again (a gap in the channel, or the end's final figures), as the opener saw it."""
        current = await self._progress(state.migration.pk)
        opened = await access.opened(self.scope, _reader(state.migration.pk, current))
        fresh: State = opened.data
        return fresh

    async def _run(
        self, state: State, subscription: hub.Subscription, cors: list[tuple[bytes, bytes]]
    ) -> None:
        await self.start(cors)
        if sse.header(self.scope, b"last-event-id") != state.event_id or state.ended:
            await self.write(sse.event("progress", state.snapshot, event_id=state.event_id))
        deadline = time.monotonic() + settings.STREAMS_MAX_SECONDS
        keepalive = settings.STREAMS_KEEPALIVE_SECONDS
        while not state.ended:
            if subscription.gap:
                subscription.gap = False
                state = await self._reread(state)
                await self.write(sse.event("progress", state.snapshot, event_id=state.event_id))
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                break  # the client reconnects (Last-Event-ID) and carries on
            data = await self.until_gone(subscription.queue.get(), min(keepalive, left))
            if data is None:
                await self.write(sse.comment("keepalive"))
                continue
            state = await self._apply(state, data)
            await self.write(sse.event("progress", state.snapshot, event_id=state.event_id))
        if state.ended:
            migration = state.migration
            await self.write(
                sse.event(
                    "end", {"status": migration.status, "error": migration.error}, event_id=state.event_id
                )
            )
        await self.finish()

    async def _apply(self, state: State, data: bytes) -> State:
        try:
            message = json.loads(data)
        except ValueError:
            return state
        if not isinstance(message, dict):
            return state
        if message.get("event") == live.STATUS_EVENT:
            if message.get("status") in TERMINAL_STATUSES:
                return await self._reread(state)  # the final figures are in the row now
            migration = state.migration
            migration.status = str(message.get("status", migration.status))
            migration.phase = str(message.get("phase", migration.phase))
            state.snapshot.update(status=migration.status, phase=migration.phase)
            history = message.get("history")
            state.history = max(state.history, history if isinstance(history, int) else 0)
            return state
        current = live.parse(message)
        state.snapshot.update(progress_view(state.migration, current))
        if "phase" in current:
            state.snapshot["phase"] = current["phase"]
        state.updated_ms = max(state.updated_ms, _updated_ms(current))
        return state
