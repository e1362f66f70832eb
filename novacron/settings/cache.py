"""Redis: the Django cache (django-redis) and the URL shared with Celery, progress and heartbeats."""

from .env import env

REDIS_URL = env("REDIS_URL", "redis://127.0.0.1:6379/0", help="Redis URL: Celery broker, cache, progress.")
CACHE_KEY_PREFIX = env("CACHE_KEY_PREFIX", "novacron", help="Prefix of every cache key (one per deployment).")

CACHES = {
    "default": {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": CACHE_KEY_PREFIX,
        "OPTIONS": {
            "CLIENT_CLASS": "django_redis.client.DefaultClient",
            "SOCKET_CONNECT_TIMEOUT": 1,
            "SOCKET_TIMEOUT": 1,
            # Redis down must never turn a read into a 500: the cache degrades to misses.
            "IGNORE_EXCEPTIONS": True,
        },
    }
}
DJANGO_REDIS_LOG_IGNORED_EXCEPTIONS = True
SESSION_ENGINE = "django.contrib.sessions.backends.db"
