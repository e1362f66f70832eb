"""apps/core/context.py: the typed request context, the caller a token's memo holds, the memo's user."""

from typing import Any

import pytest
from django.db import connection
from django.test import RequestFactory
from django.test.utils import CaptureQueriesContext
from rest_framework.request import Request

from apps.core.context import (
    MEMO_FIELDS,
    ROLE_FIELD_PREFIX,
    Acting,
    Caller,
    MemoUser,
    Viewer,
    request_context,
)

pytestmark = pytest.mark.django_db


def test_a_request_has_one_context_made_on_first_use():
    request = RequestFactory().get("/")
    context = request_context(request)
    assert context.counted_scopes == frozenset()
    context.counted_scopes = frozenset({"user"})
    assert request_context(request).counted_scopes == frozenset({"user"})
    assert request_context(RequestFactory().get("/")).counted_scopes == frozenset()


def test_drfs_request_shares_the_context_of_djangos_and_names_the_acting_project():
    request = RequestFactory().get("/")
    assert request_context(request).project_id is None
    request_context(Request(request)).acting = Acting(7, "reader")
    assert request_context(request).project_id == 7


def test_a_callers_memo_holds_its_fields_then_one_role_field_per_project():
    memo = Caller(
        user_id=3, is_staff=False, personal_project=5, roles=((5, "admin"), (9, "reader"))
    ).as_memo()
    assert tuple(memo)[: len(MEMO_FIELDS)] == MEMO_FIELDS
    assert [memo[name] for name in MEMO_FIELDS] == [3, 0, 5]
    assert {key: value for key, value in memo.items() if key.startswith(ROLE_FIELD_PREFIX)} == {
        f"{ROLE_FIELD_PREFIX}5": "admin",
        f"{ROLE_FIELD_PREFIX}9": "reader",
    }


def test_a_memo_user_answers_id_and_staff_without_a_query_and_loads_the_rest(staff: Any):
    memo_user = MemoUser(Viewer(user_id=staff.pk, is_staff=True, project_id=None))
    with CaptureQueriesContext(connection) as captured:
        assert (memo_user.pk, memo_user.is_staff, memo_user.is_authenticated, memo_user.is_active) == (
            staff.pk,
            True,
            True,
            True,
        )
    assert len(captured) == 0
    with CaptureQueriesContext(connection) as captured:
        assert memo_user.username == staff.username
        assert memo_user.email == staff.email
    assert len(captured) == 1
