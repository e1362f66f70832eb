"""Redis keys the web processes write and the control worker reads, and the latency buckets.

The web side never writes the database for monitoring: each request adds one JSON entry to the
API log list and bumps counters in the stats hash; a web process pushes its entries in batches, one
Lua call (one round trip, atomic) per batch.

Keys carry the deployment's ``CACHE_KEY_PREFIX``, so deployments (and test runs) sharing a Redis
never mix their logs.
"""

from typing import Final

from django.conf import settings

API_LOG_LIST: Final = "api_logs"  # LPUSH by web, drained from the tail
API_LOG_DROPPED: Final = "api_logs_dropped"  # counter of entries refused when full
REQUEST_STATS: Final = "request_stats"  # hash of counters since the last sample
LAST_SAMPLE: Final = "last_sample"  # epoch seconds of the last control-plane sample


def key(name: str) -> str:
    """The Redis key of ``name`` for this deployment."""
    return f"{settings.CACHE_KEY_PREFIX}:monitoring:{name}"


# Upper bounds (milliseconds) of the request latency histogram kept in REQUEST_STATS; the same
# bounds (in seconds) serve the Prometheus histogram, so both views agree.
LATENCY_BUCKETS_MS: Final = (5, 10, 25, 50, 75, 100, 150, 250, 500, 1000, 2500, 5000, 10000)
