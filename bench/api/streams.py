"""Open migration-event streams beside the API load (``bench.py --streams N``).

Against the streams service (``bench.py`` runs it: granian ASGI on ``novacron.asgi``, one worker, as
the Procfile does), :class:`StreamLoad` holds N SSE streams from one asyncio loop (a thread of its own) spread over K running
migrations, and plays the source nodes: a progress snapshot per migration every ``PUBLISH_SECONDS``
(hash and channel, as ``workers/node/migration/transfer.py`` writes them). It counts, per stream, the
events received while the publisher ran, to check that each stream got every event it was sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import redis

from workers import contract

PUBLISH_SECONDS = 0.5  # a source node publishes about twice a second
MIGRATIONS = 50  # the streams are spread over this many migrations


@dataclass
class StreamReport:
    streams: int
    opened: int
    migrations: int
    published: int  # progress events published per migration, summed
    received: int  # events the streams received while the publisher ran, summed
    expected: int  # what they should have received (each stream: its migration's events)
    complete: int  # streams that received every event of their migration
    min_ratio: float
    median_ratio: float
    server_rss_mb: float
    server_cpu_percent: float


def make_migrations(token_vm_ids: list[str], count: int) -> list[str]:
    """``count`` running migrations of the given VMs (removed again by :func:`remove_migrations`)."""
    from apps.migrations.models import Migration
    from apps.vms.models import VM, Node

    nodes = list(Node.objects.order_by("pk").values_list("pk", flat=True)[:2])
    placed = VM.objects.filter(pk__in=token_vm_ids).exclude(node=None).values_list("pk", "node_id")[:count]
    made = Migration.objects.bulk_create(
        Migration(
            vm_id=vm_id,
            source_node_id=node_id,
            dest_node_id=nodes[0] if node_id != nodes[0] else nodes[1],
            status="transferring",
            phase="memory",
            error="bench",
        )
        for vm_id, node_id in placed
    )
    return [str(migration.pk) for migration in made]


def remove_migrations(ids: list[str]) -> None:
    from apps.migrations.models import Migration

    Migration.objects.filter(pk__in=ids).delete()


class StreamLoad:
    def __init__(
        self, *, base: str, redis_url: str, token: str, migration_ids: list[str], count: int
    ) -> None:
        self.base = base
        self.token = token
        self.migration_ids = migration_ids
        self.count = count
        self.redis_url = redis_url
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.received: list[int] = []
        self.counting = False
        self.tasks: list[asyncio.Task[None]] = []
        self.client: httpx.AsyncClient | None = None
        self.opened = 0

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def open(self) -> None:
        """Open every stream; back once each has its first event (its state) or failed."""
        self.received = [0] * self.count
        self.opened = self._run(self._open())

    async def _open(self) -> int:
        limits = httpx.Limits(max_connections=self.count + 10, max_keepalive_connections=0)
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(30, read=None), limits=limits)
        ready = [asyncio.get_running_loop().create_future() for _ in range(self.count)]
        self.tasks = [asyncio.create_task(self._hold(index, ready[index])) for index in range(self.count)]
        results = await asyncio.wait_for(asyncio.gather(*ready), timeout=300)
        return sum(1 for ok in results if ok)

    async def _hold(self, index: int, ready: asyncio.Future[bool]) -> None:
        assert self.client is not None
        migration = self.migration_ids[index % len(self.migration_ids)]
        url = f"{self.base}/api/v1/migrations/{migration}/events/"
        try:
            async with self.client.stream(
                "GET", url, headers={"Authorization": f"Token {self.token}"}
            ) as answer:
                if answer.status_code != 200:
                    ready.set_result(False)
                    return
                async for line in answer.aiter_lines():
                    if line == "event: progress":
                        if not ready.done():
                            ready.set_result(True)
                        elif self.counting:
                            self.received[index] += 1
        except (httpx.HTTPError, OSError):
            if not ready.done():
                ready.set_result(False)

    def close(self) -> None:
        self._run(self._close())

    async def _close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.client is not None:
            await self.client.aclose()

    @contextlib.contextmanager
    def publishing(self) -> Iterator[Counter[str]]:
        """Play the source nodes while the block runs; the events published per migration."""
        published: Counter[str] = Counter()
        stop = threading.Event()

        def publish() -> None:
            client = redis.Redis.from_url(self.redis_url)
            percent = 0.0
            while not stop.is_set():
                percent = min(percent + 0.1, 99.0)
                pipe = client.pipeline(transaction=False)
                for migration in self.migration_ids:
                    snapshot = {
                        "percent": percent,
                        "phase": "memory",
                        "rate_bps": 1e8,
                        "updated": time.time(),
                    }
                    key = contract.MIGRATION_PROGRESS_KEY.format(id=migration)
                    pipe.hset(key, mapping={name: str(value) for name, value in snapshot.items()})
                    pipe.publish(contract.MIGRATION_EVENTS_CHANNEL.format(id=migration), json.dumps(snapshot))
                    published[migration] += 1
                pipe.execute()
                stop.wait(PUBLISH_SECONDS)
            client.close()

        self.counting = True
        publisher = threading.Thread(target=publish, daemon=True)
        publisher.start()
        try:
            yield published
        finally:
            stop.set()
            publisher.join()
            time.sleep(1.0)  # the last events reach the clients
            self.counting = False

    def report(self, published: Counter[str], *, rss_mb: float, cpu_percent: float) -> StreamReport:
        expected = [
            published[self.migration_ids[index % len(self.migration_ids)]] for index in range(self.count)
        ]
        ratios = [got / want for got, want in zip(self.received, expected, strict=True) if want]
        return StreamReport(
            streams=self.count,
            opened=self.opened,
            migrations=len(self.migration_ids),
            published=sum(published.values()),
            received=sum(self.received),
            expected=sum(expected),
            complete=sum(1 for got, want in zip(self.received, expected, strict=True) if got >= want),
            min_ratio=round(min(ratios), 4) if ratios else 0.0,
            median_ratio=round(statistics.median(ratios), 4) if ratios else 0.0,
            server_rss_mb=round(rss_mb, 1),
            server_cpu_percent=round(cpu_percent, 1),
        )

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
