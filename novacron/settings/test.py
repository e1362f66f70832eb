"""Test settings: the real PostgreSQL and Redis from the environment, a fast password hasher."""

import os

os.environ.setdefault("SECRET_KEY", "test-secret-key-not-for-production")
os.environ.setdefault("DWCP_SECRET", "test-dwcp-secret")
os.environ.setdefault("CACHE_KEY_PREFIX", f"novacron-test-{os.getpid()}")

from . import *  # noqa: E402, F403
from . import NOVACRON, REST_FRAMEWORK  # noqa: E402

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"] = {"user": "100000/min", "anon": "100000/min", "token": "5/min"}
NOVACRON["NODE_HEARTBEAT_TIMEOUT"] = 30
