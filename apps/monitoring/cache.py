"""The default cache (django-redis) with its hits and misses counted for monitoring."""

from typing import Any

from django_redis.cache import RedisCache

from .instruments import record_cache_lookup

_ABSENT = object()


class InstrumentedRedisCache(RedisCache):
    """django-redis' cache; ``get`` and ``get_many`` report hits and misses (a Redis error is a miss)."""

    def get(self, key: Any, default: Any = None, version: Any = None, client: Any = None) -> Any:
        value = super().get(key, _ABSENT, version=version, client=client)
        record_cache_lookup(hit=value is not _ABSENT)
        return default if value is _ABSENT else value

    def get_many(self, *args: Any, **kwargs: Any) -> Any:
        found = super().get_many(*args, **kwargs)
        keys = args[0] if args else kwargs.get("keys", ())
        for key in keys:
            record_cache_lookup(hit=bool(found) and key in found)
        return found
