"""One Redis pub/sub connection per process, shared by every open stream.

A stream asks the hub for a :class:`Subscription` to a channel; the hub subscribes the channel on its
single connection when the first stream wants it and unsubscribes when the last one leaves, and one
reader task hands each message to the queues of that channel's subscriptions. Invariants: however
many streams are open, the process holds one pub/sub connection (plus the small pool of
:func:`redis_client` for reads); a subscriber that does not keep up loses its oldest messages, never
blocks the others, and is told so (``Subscription.gap``) so it can read the current state again.
Redis pub/sub delivers at most once: a stream re-reads the state after a reconnection (``gap``).
"""

import asyncio
import contextlib
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Final

import redis
import redis.asyncio as aioredis
from django.conf import settings

logger = logging.getLogger(__name__)

CLIENT_NAME: Final = "novacron-streams"  # CLIENT LIST shows this process's connections by this name
QUEUE_SIZE: Final = 64  # messages kept per subscriber; progress is cumulative, so older ones may go
READ_TIMEOUT_SECONDS: Final = 1.0
RECONNECT_SECONDS: Final = 1.0
READ_POOL_SIZE: Final = 2  # connections for the reads a stream makes when it opens


@dataclass(eq=False)
class Subscription:
    """A stream's view of one channel: its messages, in order, as bytes."""

    channel: str
    queue: asyncio.Queue[bytes] = field(default_factory=lambda: asyncio.Queue(QUEUE_SIZE))
    gap: bool = False  # messages were dropped (slow reader, lost connection): re-read the state

    def deliver(self, data: bytes) -> None:
        if self.queue.full():
            self.queue.get_nowait()
            self.gap = True
        self.queue.put_nowait(data)


class Hub:
    """The process's pub/sub connection and who listens to which channel (one per event loop)."""

    def __init__(self, url: str) -> None:
        self._client = aioredis.Redis.from_url(url, client_name=CLIENT_NAME, max_connections=1)
        self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        self._listeners: defaultdict[str, set[Subscription]] = defaultdict(set)
        self._lock = asyncio.Lock()
        self._subscribed = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._closed = False  # the server shut down: streams still leaving have nothing to undo

    async def subscribe(self, channel: str) -> Subscription:
        subscription = Subscription(channel)
        async with self._lock:
            first = not self._listeners[channel]
            self._listeners[channel].add(subscription)
            if first:
                try:
                    await self._pubsub.subscribe(channel)
                except BaseException:
                    self._listeners[channel].discard(subscription)
                    raise
            self._subscribed.set()
            if self._reader is None or self._reader.done():
                self._reader = asyncio.create_task(self._read(), name="streams-hub-reader")
        return subscription

    async def unsubscribe(self, subscription: Subscription) -> None:
        async with self._lock:
            listeners = self._listeners.get(subscription.channel)
            if self._closed or listeners is None or subscription not in listeners:
                return
            listeners.discard(subscription)
            if not listeners:
                del self._listeners[subscription.channel]
                with contextlib.suppress(redis.RedisError, OSError):
                    await self._pubsub.unsubscribe(subscription.channel)

    def listener_count(self) -> int:
        return sum(len(listeners) for listeners in self._listeners.values())

    async def _read(self) -> None:
        while True:
            if not self._pubsub.subscribed:
                self._subscribed.clear()
                await self._subscribed.wait()
                continue
            try:
                message = await self._pubsub.get_message(timeout=READ_TIMEOUT_SECONDS)
            except (redis.RedisError, OSError) as exc:
                logger.warning("streams: Redis pub/sub connection lost, reconnecting: %s", exc)
                self._mark_gaps()
                await asyncio.sleep(RECONNECT_SECONDS)
                continue
            if message is None or message.get("type") != "message":
                continue
            channel = (
                message["channel"].decode() if isinstance(message["channel"], bytes) else message["channel"]
            )
            data = message["data"] if isinstance(message["data"], bytes) else str(message["data"]).encode()
            for subscription in tuple(self._listeners.get(channel, ())):
                subscription.deliver(data)

    def _mark_gaps(self) -> None:
        for listeners in self._listeners.values():
            for subscription in listeners:
                subscription.gap = True

    async def close(self) -> None:
        async with self._lock:
            self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        await self._pubsub.aclose()
        await self._client.aclose()


_hubs: dict[asyncio.AbstractEventLoop, Hub] = {}
_read_clients: dict[asyncio.AbstractEventLoop, aioredis.Redis] = {}


def hub() -> Hub:
    """The hub of the running event loop (made on first use)."""
    loop = asyncio.get_running_loop()
    if loop not in _hubs:
        _hubs[loop] = Hub(settings.REDIS_URL)
    return _hubs[loop]


def redis_client() -> aioredis.Redis:
    """A small shared pool for the reads a stream makes when it opens (the progress hash)."""
    loop = asyncio.get_running_loop()
    if loop not in _read_clients:
        pool = aioredis.BlockingConnectionPool.from_url(
            settings.REDIS_URL, client_name=CLIENT_NAME, max_connections=READ_POOL_SIZE, timeout=5
        )
        _read_clients[loop] = aioredis.Redis(connection_pool=pool)
    return _read_clients[loop]


async def close() -> None:
    """Close this loop's connections (the server's shutdown)."""
    loop = asyncio.get_running_loop()
    found = _hubs.pop(loop, None)
    if found is not None:
        await found.close()
    client = _read_clients.pop(loop, None)
    if client is not None:
        await client.aclose(close_connection_pool=True)
