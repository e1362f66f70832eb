"""Health probes, the token endpoint and its rate limit, the schema and docs pages."""

import pytest
from django.core.cache import cache

pytestmark = pytest.mark.django_db


def test_healthz_and_readyz_answer_without_auth(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    body = client.get("/readyz").json()
    assert body == {"status": "ok", "checks": {"database": "ok", "redis": "ok"}}


def test_readyz_names_an_unreachable_redis(client, settings):
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["redis"].startswith("unreachable")


def test_token_exchange_and_use(client, user):
    response = client.post("/api/v1/auth/token/", {"username": "alice", "password": "pw-correct-horse"})
    assert response.status_code == 200
    token = response.json()["token"]
    me = client.get("/api/v1/users/me/", HTTP_AUTHORIZATION=f"Token {token}")
    assert me.json()["username"] == "alice"


def test_wrong_password_is_400_in_the_error_shape(client, user):
    cache.clear()
    response = client.post(
        "/api/v1/auth/token/", {"username": "alice", "password": "wrong"}, content_type="application/json"
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid"


def test_token_endpoint_is_rate_limited(client, user):
    cache.clear()
    statuses = [
        client.post("/api/v1/auth/token/", {"username": "alice", "password": "x"}).status_code
        for _ in range(7)
    ]
    assert statuses[:5] == [400] * 5
    assert statuses[5:] == [429, 429]
    response = client.post("/api/v1/auth/token/", {"username": "alice", "password": "x"})
    assert response.json()["error"]["code"] == "throttled"
    assert "Retry-After" in response.headers
    cache.clear()


def test_schema_and_docs(client, api):
    schema = api.get("/api/v1/schema/?format=json").json()
    assert schema["openapi"].startswith("3.")
    assert "/api/v1/vms/batch/" in schema["paths"]
    assert client.get("/api/v1/docs/").status_code == 200


def test_browsable_api_renders_html(api):
    response = api.get("/api/v1/vms/", HTTP_ACCEPT="text/html")
    assert response.status_code == 200
    assert b"<html" in response.content.lower()


def test_oversized_body_is_413(api):
    response = api.post("/api/v1/vms/", data="x" * (3 * 1024 * 1024), content_type="application/json")
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
