"""Schemathesis against the OpenAPI schema: every operation, generated requests with a fixed seed, as a
normal user and as staff. No answer may be a 5xx, and every answer must match the schema (body and
content type). Runs in-process through the WSGI app on the test database.
"""

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from django.core import signals
from django.db import close_old_connections
from hypothesis import HealthCheck, settings
from rest_framework.authtoken.models import Token
from schemathesis import checks

from novacron.wsgi import application

pytestmark = pytest.mark.django_db

schema = schemathesis.openapi.from_wsgi("/api/v1/schema/", application)

# Per operation and per user: 46 operations x 2 users x 11 examples > 1,000 cases.
EXAMPLES = 11
CHECKS = [checks.not_a_server_error, checks.response_schema_conformance, checks.content_type_conformance]
_counts = {"cases": 0}


@pytest.fixture(scope="module", autouse=True)
def _count_cases() -> Iterator[None]:
    """Print how many requests were generated (operations with few parameters exhaust early)."""
    yield
    print(f"\nschemathesis: {_counts['cases']} generated requests")


@pytest.fixture(autouse=True)
def _keep_the_test_connection() -> Iterator[None]:
    """The WSGI handler closes the connection after each request; inside the test's transaction it must
    not (Django's test client disconnects the same handlers)."""
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    try:
        yield
    finally:
        signals.request_started.connect(close_old_connections)
        signals.request_finished.connect(close_old_connections)


@pytest.fixture
def tokens(make_user, make_node, make_image) -> dict[str, str]:
    make_node("fuzz-node")
    make_image("fuzz-image")
    users = {"user": make_user("fuzzer"), "staff": make_user("fuzz-admin", staff=True)}
    return {role: Token.objects.create(user=user).key for role, user in users.items()}


@pytest.mark.parametrize("role", ["user", "staff"])
@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    derandomize=True,  # a fixed seed: the same cases every run
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)
def test_api_answers_every_generated_request_within_its_schema(case: Any, role: str, tokens) -> None:
    _counts["cases"] += 1
    case.call_and_validate(headers={"Authorization": f"Token {tokens[role]}"}, checks=CHECKS)
