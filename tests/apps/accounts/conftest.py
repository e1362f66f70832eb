"""Helpers of the accounts tests: clients by token secret, queries counted, Redis state emptied."""

from collections.abc import Iterator
from typing import Any

import pytest
from django.core.cache import cache
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient

from tests.apps.vms.conftest import forget

LOGIN_THROTTLE_KEY = "throttle_token_127.0.0.1"  # DRF's key of the test client's login attempts


@pytest.fixture(autouse=True)
def _empty_api_state() -> Iterator[None]:
    """Every test starts and ends without this process's cache entries, token memos and rate counters
    (``auth/token/``'s too: 5 a minute per address in the test settings)."""
    forget("apicache", "authtoken", "throttle")
    cache.delete(LOGIN_THROTTLE_KEY)
    yield
    forget("apicache", "authtoken", "throttle")
    cache.delete(LOGIN_THROTTLE_KEY)


def bearer(secret: str) -> APIClient:
    """A client sending ``Authorization: Token <secret>``."""
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {secret}")
    return client


def counted_get(client: APIClient, path: str) -> tuple[Any, int]:
    """A GET and the number of database queries it made (0: the VM read fast path answered a hit)."""
    with CaptureQueriesContext(connection) as captured:
        response = client.get(path)
    return response, len(captured)
