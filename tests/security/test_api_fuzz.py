"""Schemathesis against the OpenAPI schema: every operation, generated requests with a fixed seed, as a
normal user and as staff. No answer may be a 5xx, and every answer must match the schema (body and
content type). Runs in-process through the WSGI app on the test database.
"""

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from django.core import signals
from django.db import close_old_connections
from hypothesis import HealthCheck, settings
from schemathesis import checks

from apps.accounts.services import token_create
from novacron.wsgi import application

pytestmark = pytest.mark.django_db

schema = schemathesis.openapi.from_wsgi("/api/v1/schema/", application)

ROLES = ["user", "staff"]
# Hypothesis examples per operation and role in the fuzzing phase (schemathesis adds its examples and
# coverage phases): every test sends at least EXAMPLES requests, a whole run (55 operations x 2 roles)
# at least CLAIMED_CASES.
EXAMPLES = 11
CLAIMED_CASES = 1000
CHECKS = [checks.not_a_server_error, checks.response_schema_conformance, checks.content_type_conformance]
_cases: Counter[str] = Counter()  # requests sent, per test (operation and role)


@pytest.fixture(scope="module", autouse=True)
def _count_cases() -> Iterator[None]:
    """After the module: each test sent at least EXAMPLES requests, a whole run at least CLAIMED_CASES."""
    yield
    operations = sum(1 for _ in schema.get_all_operations())
    total = sum(_cases.values())
    print(
        f"\nschemathesis: {total} generated requests over {len(_cases)} tests (fewest {min(_cases.values())})"
    )
    few = {test: count for test, count in _cases.items() if count < EXAMPLES}
    assert not few, f"tests that sent fewer than {EXAMPLES} requests: {few}"
    if len(_cases) == operations * len(ROLES):  # not a -k selection
        assert total >= CLAIMED_CASES, (
            f"a whole run sent {total} requests, fewer than the {CLAIMED_CASES} claimed"
        )


@pytest.fixture(autouse=True)
def _count(request: pytest.FixtureRequest) -> None:
    _cases[request.node.nodeid] += 0  # a test that generates nothing is counted too, with 0


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
    return {role: token_create(user=user).secret for role, user in users.items()}


@pytest.mark.parametrize("role", ROLES)
@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    derandomize=True,  # a fixed seed: the same cases every run
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)
def test_api_answers_every_generated_request_within_its_schema(
    case: Any, role: str, tokens, request: pytest.FixtureRequest
) -> None:
    _cases[request.node.nodeid] += 1
    # The in-process WSGI transport does not decode gzip: bodies come plain (compression has its own tests).
    headers = {"Authorization": f"Token {tokens[role]}", "Accept-Encoding": "identity"}
    case.call_and_validate(headers=headers, checks=CHECKS)
