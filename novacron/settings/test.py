"""Test settings: the real PostgreSQL and Redis from the environment, a fast password hasher."""

import os

os.environ.setdefault("SECRET_KEY", "test-secret-key-not-for-production")
os.environ.setdefault("DWCP_SECRET", "test-dwcp-secret")
os.environ.setdefault("CACHE_KEY_PREFIX", f"novacron-test-{os.getpid()}")
# A Redis database of its own, so queued test messages never reach a running development system.
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/15")

from .main import *  # noqa: F403
from .main import MONITORING, NOVACRON, REST_FRAMEWORK

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"] = {
    "user": "100000/min",
    "anon": "100000/min",
    "token": "5/min",
    "console": "30/min",
}
NOVACRON["NODE_HEARTBEAT_TIMEOUT"] = 30
# Each API log entry in Redis when its request ends, so tests read it at once (the batched pushes of
# production have tests of their own: tests/apps/monitoring/test_api_logs.py).
MONITORING["API_LOG_PUSH_INTERVAL"] = 0
