"""The hub against real Redis: one pub/sub connection for every subscription, in order, and a slow
subscriber that loses its oldest messages (and is told) without holding up the others."""

import asyncio
import uuid

import redis.asyncio as aioredis
from django.conf import settings

from apps.streams.hub import QUEUE_SIZE, Hub


async def _subscribers(client: aioredis.Redis, channel: str) -> int:
    return int(dict(await client.pubsub_numsub(channel))[channel.encode()])


def test_subscriptions_share_one_connection_and_get_their_channels_messages_in_order():
    async def scenario() -> None:
        hub, client = Hub(settings.REDIS_URL), aioredis.Redis.from_url(settings.REDIS_URL)
        first, second = f"test-hub-{uuid.uuid4()}", f"test-hub-{uuid.uuid4()}"
        a, b, c = await hub.subscribe(first), await hub.subscribe(first), await hub.subscribe(second)
        for number in range(3):
            await client.publish(first, f"first {number}")
        await client.publish(second, "second")
        for subscription in (a, b):
            got = [await asyncio.wait_for(subscription.queue.get(), 5) for _ in range(3)]
            assert got == [b"first 0", b"first 1", b"first 2"]
        assert await asyncio.wait_for(c.queue.get(), 5) == b"second" and c.queue.empty()
        assert await _subscribers(client, first) == 1  # the hub's one connection, not one per stream
        await hub.unsubscribe(a)
        assert await _subscribers(client, first) == 1 and hub.listener_count() == 2
        await hub.unsubscribe(b)
        await hub.unsubscribe(b)  # twice: nothing more happens
        for _ in range(50):
            if await _subscribers(client, first) == 0:
                break
            await asyncio.sleep(0.05)
        assert await _subscribers(client, first) == 0 and hub.listener_count() == 1
        await hub.close()
        await client.aclose()

    asyncio.run(scenario())


def test_a_slow_subscriber_keeps_the_newest_messages_and_knows_it_lost_some():
    async def scenario() -> None:
        hub, client = Hub(settings.REDIS_URL), aioredis.Redis.from_url(settings.REDIS_URL)
        channel = f"test-hub-{uuid.uuid4()}"
        slow, reader = await hub.subscribe(channel), await hub.subscribe(channel)
        got: list[bytes] = []
        for number in range(QUEUE_SIZE + 5):
            await client.publish(channel, str(number))
            got.append(await asyncio.wait_for(reader.queue.get(), 5))
        assert len(got) == QUEUE_SIZE + 5 and not reader.gap
        kept = [slow.queue.get_nowait() for _ in range(slow.queue.qsize())]
        assert slow.gap and kept == [str(number).encode() for number in range(5, QUEUE_SIZE + 5)]
        await hub.close()
        await client.aclose()

    asyncio.run(scenario())


def test_a_stream_leaving_after_the_hub_closed_at_shutdown_is_no_error():
    async def scenario() -> None:
        hub = Hub(settings.REDIS_URL)
        subscription = await hub.subscribe(f"test-hub-{uuid.uuid4()}")
        await hub.close()
        await hub.unsubscribe(subscription)  # once raised AttributeError from the closed connection
        assert hub.listener_count() == 1  # nothing undone on a closed hub

    asyncio.run(scenario())
