"""apps/core/context.py: the typed request context, the viewer a token's memo holds, the memo's user."""

from typing import Any

import pytest
from django.db import connection
from django.test import RequestFactory
from django.test.utils import CaptureQueriesContext

from apps.core.context import VIEWER_FIELDS, MemoUser, Viewer, request_context

pytestmark = pytest.mark.django_db


def test_a_request_has_one_context_made_on_first_use():
    request = RequestFactory().get("/")
    context = request_context(request)
    assert context.counted_scopes == frozenset()
    context.counted_scopes = frozenset({"user"})
    assert request_context(request).counted_scopes == frozenset({"user"})
    assert request_context(RequestFactory().get("/")).counted_scopes == frozenset()


def test_a_viewer_goes_through_its_memo_hash_unchanged():
    for viewer in (Viewer(user_id=3, is_staff=False), Viewer(user_id=12, is_staff=True)):
        memo = viewer.as_memo()
        assert tuple(memo) == VIEWER_FIELDS
        as_redis_returns = [str(memo[name]).encode() for name in VIEWER_FIELDS]
        assert Viewer.from_memo(as_redis_returns) == viewer


def test_a_memo_user_answers_id_and_staff_without_a_query_and_loads_the_rest(staff: Any):
    memo_user = MemoUser(Viewer(user_id=staff.pk, is_staff=True))
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
