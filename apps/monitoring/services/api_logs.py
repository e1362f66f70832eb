"""API logs: drain the Redis list the web processes fill, one bulk INSERT per batch.

Entries are taken from the tail (oldest first) inside a Redis transaction; when the INSERT fails
they are pushed back to the tail, so a database outage delays logs instead of losing them.
"""

import logging
from datetime import UTC, datetime
from typing import Any

import orjson
import redis
from django.contrib.auth import get_user_model
from django.db import transaction

from ..conf import monitoring_setting
from ..keys import API_LOG_LIST, key
from ..models import APILog

logger = logging.getLogger(__name__)

MAX_BATCHES_PER_RUN = 50  # bounds one task run; the next beat tick continues


def api_logs_flush(*, client: redis.Redis, batch: int | None = None) -> int:
    """Write buffered API log entries to ``api_logs``; returns the number of rows inserted."""
    size = batch or monitoring_setting("API_LOG_FLUSH_BATCH")
    written = 0
    for _ in range(MAX_BATCHES_PER_RUN):
        pipe = client.pipeline(transaction=True)
        pipe.lrange(key(API_LOG_LIST), -size, -1)
        pipe.ltrim(key(API_LOG_LIST), 0, -size - 1)
        raw_entries, _ = pipe.execute()
        if not raw_entries:
            break
        raw_entries.reverse()  # LPUSH put the newest first: insert in arrival order
        try:
            written += _insert(raw_entries)
        except Exception:
            # Back to the tail, oldest last-in so that the order survives; re-raised for the retry.
            client.rpush(key(API_LOG_LIST), *reversed(raw_entries))
            raise
        if len(raw_entries) < size:
            break
    return written


@transaction.atomic
def _insert(raw_entries: list[bytes]) -> int:
    entries = [entry for entry in (_parse(raw) for raw in raw_entries) if entry is not None]
    if not entries:
        return 0
    user_ids = {entry["user"] for entry in entries if entry["user"] is not None}
    known_users = set(
        get_user_model().objects.filter(pk__in=user_ids).values_list("pk", flat=True) if user_ids else ()
    )
    rows = [
        APILog(
            timestamp=datetime.fromtimestamp(entry["ts"], tz=UTC),
            user_id=entry["user"] if entry["user"] in known_users else None,
            method=entry["method"],
            endpoint=entry["endpoint"],
            status=entry["status"],
            duration_ms=entry["ms"],
            response_bytes=entry["bytes"],
            request_id=entry["rid"],
        )
        for entry in entries
    ]
    APILog.objects.bulk_create(rows, batch_size=len(rows))  # one INSERT statement
    return len(rows)


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        entry = orjson.loads(raw)
        return {
            "ts": float(entry["ts"]),
            "user": int(entry["user"]) if entry.get("user") is not None else None,
            "method": str(entry["method"])[:8],
            "endpoint": str(entry["endpoint"])[:255],
            "status": max(0, min(int(entry["status"]), 999)),
            "ms": max(0.0, float(entry["ms"])),
            "bytes": max(0, min(int(entry["bytes"]), 2**31 - 1)),
            "rid": str(entry.get("rid", ""))[:64],
        }
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        logger.warning("API log entry dropped (%s): %r", exc, raw[:200])
        return None
