"""Token authentication: DRF's answers, one query per request."""

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient

pytestmark = pytest.mark.django_db


def test_a_valid_token_authenticates_in_one_query(api, user):
    with CaptureQueriesContext(connection) as captured:
        response = api.get("/api/v1/users/me/")
    assert response.status_code == 200
    assert response.json()["username"] == user.username
    assert sum("api_tokens" in query["sql"] for query in captured.captured_queries) == 1


def test_unknown_tokens_and_inactive_users_are_401(api, user):
    stranger = APIClient()
    stranger.credentials(HTTP_AUTHORIZATION="Token " + "0" * 40)
    response = stranger.get("/api/v1/users/me/")
    assert response.status_code == 401
    assert response.json()["error"]["message"] == "Invalid token."
    type(user).objects.filter(pk=user.pk).update(is_active=False)
    response = api.get("/api/v1/users/me/")
    assert response.status_code == 401
    assert response.json()["error"]["message"] == "User inactive or deleted."


def test_a_deleted_token_stops_working_at_once(api, user):
    assert api.get("/api/v1/users/me/").status_code == 200
    user.api_tokens.all().delete()
    assert api.get("/api/v1/users/me/").status_code == 401
