"""Monitoring writes: metric samples drained from Redis in one bulk insert per flush."""

import json
import logging
from datetime import UTC, datetime
from typing import Any

import redis

from apps.vms.models import VM, Node
from workers import contract

from .models import Metric

logger = logging.getLogger(__name__)

FLUSH_MAX = 50_000  # samples per flush; at 10 s per node flush this covers hundreds of nodes


def metrics_flush(*, client: redis.Redis, limit: int = FLUSH_MAX) -> int:
    """Move up to ``limit`` samples from the Redis list into ``metrics`` with one bulk insert."""
    pipe = client.pipeline()
    pipe.lrange(contract.METRICS_LIST, 0, limit - 1)
    pipe.ltrim(contract.METRICS_LIST, limit, -1)
    raw_samples, _ = pipe.execute()
    samples = [sample for sample in (_parse(raw) for raw in raw_samples) if sample is not None]
    if not samples:
        return 0
    nodes = dict(Node.objects.filter(name__in={s["node"] for s in samples}).values_list("name", "pk"))
    vm_ids = {
        str(pk)
        for pk in VM.objects.filter(pk__in={s["vm"] for s in samples if s.get("vm")}).values_list(
            "pk", flat=True
        )
    }
    rows = [
        Metric(
            timestamp=datetime.fromtimestamp(sample["ts"], tz=UTC),
            node_id=nodes.get(sample["node"]),
            vm_id=sample["vm"] if sample.get("vm") in vm_ids else None,
            name=sample["name"],
            value=sample["value"],
        )
        for sample in samples
    ]
    Metric.objects.bulk_create(rows, batch_size=5000)
    return len(rows)


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        sample = json.loads(raw)
        sample["ts"] = float(sample["ts"])
        sample["value"] = float(sample["value"])
        if not isinstance(sample["name"], str) or not isinstance(sample["node"], str):
            raise TypeError("name and node must be strings")
        sample["name"] = sample["name"][:100]
    except (ValueError, KeyError, TypeError) as exc:
        logger.warning("metric sample dropped (%s): %r", exc, raw[:200])
        return None
    return sample
