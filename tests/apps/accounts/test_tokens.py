"""API tokens: several named tokens per user, shown once, stored hashed; list, revoke, expiry and
read-only; revocation, deactivation and a staff change in force on the next request, the VM read
fast path included. Against the real PostgreSQL and Redis."""

import hashlib
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from django.conf import settings
from django.db import connection

from apps.accounts.models import ApiToken
from apps.accounts.services import token_create
from apps.core.authentication import forget_tokens, remember_token, token_memo_key
from apps.projects.acting import caller_of
from tests.apps.accounts.conftest import bearer, counted_get
from tests.conftest import vm_payload

pytestmark = pytest.mark.django_db


def _make(client: Any, **fields: Any) -> dict[str, Any]:
    response = client.post("/api/v1/tokens/", fields, format="json")
    assert response.status_code == 201, response.content
    return response.json()


def _warm(client: Any) -> None:
    """Fill the VM list's cache entry and the token's memo, then check the fast path answers."""
    assert client.get("/api/v1/vms/").status_code == 200  # DRF: authenticates, remembers, caches
    response, queries = counted_get(client, "/api/v1/vms/")
    assert (response.status_code, queries) == (200, 0)  # a fast-path hit


def _redis_dump() -> bytes:
    """Every key and value of the test Redis database, as bytes."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    found = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        readers: dict[Any, Callable[[bytes], Any]] = {
            b"string": client.get,
            b"hash": client.hgetall,
            b"list": lambda name: client.lrange(name, 0, -1),
            b"set": client.smembers,
            b"zset": lambda name: client.zrange(name, 0, -1),
            b"stream": client.xrange,
        }
        value = readers.get(kind, lambda name: b"")(key)
        found.append(key + b" " + repr(value).encode())
    return b"\n".join(found)


def _database_dump() -> str:
    """Every row of every table, as text."""
    rows = []
    with connection.cursor() as cursor:
        for table in connection.introspection.table_names():
            cursor.execute(f"SELECT t::text FROM {connection.ops.quote_name(table)} t")
            rows += [row[0] for row in cursor.fetchall()]
    return "\n".join(rows)


def test_a_user_has_several_named_tokens_each_secret_shown_once(api, user):
    ci = _make(api, name="ci")
    laptop = _make(api, name="laptop", read_only=True)
    for made in (ci, laptop):
        assert made["token"].startswith("nc_") and len(made["token"]) == 46
        assert made["prefix"] == made["token"][:10]
        assert made["expires_at"] is None and made["expired"] is False
    listed = api.get("/api/v1/tokens/").json()["results"]
    assert [row["name"] for row in listed][:2] == ["laptop", "ci"]  # newest first; then the fixture's
    assert all("token" not in row for row in listed)
    detail = api.get(f"/api/v1/tokens/{ci['id']}/").json()
    assert detail == {key: value for key, value in ci.items() if key != "token"}
    assert bearer(ci["token"]).get("/api/v1/users/me/").json()["username"] == user.username


def test_secrets_live_neither_in_the_database_nor_in_redis_nor_in_logs(api, node, image, caplog):
    caplog.set_level(logging.DEBUG)
    made = _make(api, name="hashed")
    secret = made["token"]
    client = bearer(secret)
    assert client.post("/api/v1/vms/", vm_payload(), format="json").status_code == 202
    _warm(client)
    row = ApiToken.objects.get(pk=made["id"])
    assert row.digest == hashlib.sha256(secret.encode()).hexdigest()
    dump = _database_dump()
    assert row.digest in dump and secret not in dump and secret[10:] not in dump
    stored = _redis_dump()
    assert token_memo_key(secret).encode() in stored
    assert secret.encode() not in stored and secret[10:].encode() not in stored
    assert secret not in caplog.text


def test_names_are_unique_per_user_and_bad_input_is_400_with_a_message(api, other_api):
    _make(api, name="ci")
    _make(other_api, name="ci")  # another user's names are theirs
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    cases = [
        ({"name": "ci"}, "name"),
        ({}, "name"),
        ({"name": ""}, "name"),
        ({"name": "x" * 65}, "name"),
        ({"name": "nul\x00"}, "name"),
        ({"name": "late", "expires_at": past}, "expires_at"),
        ({"name": "odd", "expires_at": "tomorrow"}, "expires_at"),
        ({"name": "typo", "readonly": True}, "readonly"),
    ]
    for body, field in cases:
        response = api.post("/api/v1/tokens/", body, format="json")
        assert response.status_code == 400, (body, response.content)
        error = response.json()["error"]
        assert error["code"] == "invalid" and error["message"] and field in error["fields"], (body, error)
    assert api.post("/api/v1/tokens/", {"name": "ci"}, format="json").json()["error"]["fields"]["name"] == [
        "You already have a token named 'ci'; choose another name."
    ]


def test_a_revoked_token_is_refused_on_the_next_request_through_the_fast_path(api, user, node, image):
    made = _make(api, name="to-revoke")
    client = bearer(made["token"])
    _warm(client)
    assert api.delete(f"/api/v1/tokens/{made['id']}/").status_code == 204
    response = client.get("/api/v1/vms/")
    assert response.status_code == 401
    assert response.json()["error"]["message"] == "Invalid token."
    assert api.get(f"/api/v1/tokens/{made['id']}/").status_code == 404
    assert api.get("/api/v1/vms/").status_code == 200  # the user's other tokens still work


def test_a_memo_read_before_a_revocation_is_never_stored_after_it(user):
    """A request that looked the token up just before it was revoked writes its memo afterwards: the
    tombstone refuses it, so the fast path never answers the revoked token."""
    issued = token_create(user=user, name="raced")
    forget_tokens([issued.token.digest])  # the revocation's
    remember_token(issued.secret, caller_of(user))  # the late write of the request that read the old row
    memo = redis.Redis.from_url(settings.REDIS_URL).hgetall(token_memo_key(issued.secret))
    assert b"user_id" not in memo


def test_another_users_token_is_404_and_stays(api, other_api):
    made = _make(api, name="mine")
    for method in ("get", "delete"):
        response = getattr(other_api, method)(f"/api/v1/tokens/{made['id']}/")
        assert response.status_code == 404, (method, response.content)
    assert made["id"] not in [row["id"] for row in other_api.get("/api/v1/tokens/").json()["results"]]
    assert bearer(made["token"]).get("/api/v1/users/me/").status_code == 200


def test_an_expired_token_is_refused_even_where_the_fast_path_would_answer(api, node, image):
    expires_at = datetime.now(UTC) + timedelta(seconds=2)
    made = _make(api, name="short", expires_at=expires_at.isoformat())
    client = bearer(made["token"])
    _warm(client)
    memo_ttl = redis.Redis.from_url(settings.REDIS_URL).pttl(token_memo_key(made["token"]))
    assert 0 < memo_ttl <= 2000  # never beyond the token's expiry
    time.sleep(max(0.0, (expires_at - datetime.now(UTC)).total_seconds()) + 0.05)
    response = client.get("/api/v1/vms/")
    assert response.status_code == 401
    assert response.json()["error"]["message"] == "Token expired."
    assert api.get(f"/api/v1/tokens/{made['id']}/").json()["expired"] is True


def test_a_read_only_token_reads_and_is_refused_every_write_with_403(api, node, image):
    vm = api.post("/api/v1/vms/", vm_payload(), format="json").json()
    made = _make(api, name="dashboards", read_only=True)
    reader = bearer(made["token"])
    assert reader.get("/api/v1/vms/").status_code == 200
    assert reader.get(f"/api/v1/vms/{vm['id']}/").status_code == 200
    assert reader.get("/api/v1/users/me/").status_code == 200
    writes = [
        ("post", "/api/v1/vms/", vm_payload(name="web-2")),
        ("patch", f"/api/v1/vms/{vm['id']}/", {"name": "renamed"}),
        ("delete", f"/api/v1/vms/{vm['id']}/", None),
        ("post", f"/api/v1/vms/{vm['id']}/stop/", None),
        ("post", "/api/v1/tokens/", {"name": "escalate"}),
        ("delete", f"/api/v1/tokens/{made['id']}/", None),
    ]
    for method, path, body in writes:
        response = getattr(reader, method)(path, body, format="json")
        assert response.status_code == 403, (method, path, response.content)
        assert "read-only" in response.json()["error"]["message"]
    assert api.get(f"/api/v1/vms/{vm['id']}/").json()["name"] == "web-1"
    assert ApiToken.objects.filter(pk=made["id"]).exists()


def test_a_deactivated_user_is_refused_on_the_next_request_through_the_fast_path(
    api, staff_api, user, node, image
):
    _warm(api)
    response = staff_api.patch(f"/api/v1/users/{user.pk}/", {"is_active": False}, format="json")
    assert response.status_code == 200 and response.json()["is_active"] is False
    refused = api.get("/api/v1/vms/")
    assert refused.status_code == 401
    assert refused.json()["error"]["message"] == "User inactive or deleted."
    staff_api.patch(f"/api/v1/users/{user.pk}/", {"is_active": True}, format="json")
    assert api.get("/api/v1/vms/").status_code == 200


def test_a_staff_flag_given_is_seen_on_the_next_request_through_the_fast_path(
    api, other_api, staff_api, user, node, image
):
    other_api.post("/api/v1/vms/", vm_payload(name="bobs"), format="json")
    _warm(api)
    assert api.get("/api/v1/vms/").json()["results"] == []
    staff_api.patch(f"/api/v1/users/{user.pk}/", {"is_staff": True}, format="json")
    assert [row["name"] for row in api.get("/api/v1/vms/").json()["results"]] == ["bobs"]
    staff_api.patch(f"/api/v1/users/{user.pk}/", {"is_staff": False}, format="json")
    for _ in range(2):
        assert api.get("/api/v1/vms/").json()["results"] == []


def test_auth_token_makes_a_new_token_per_call_with_optional_fields(client, user):
    login = {"username": user.username, "password": "pw-correct-horse"}
    first = client.post("/api/v1/auth/token/", login)  # a form, as the README's curl sends it
    second = client.post("/api/v1/auth/token/", login, content_type="application/json")
    assert first.status_code == second.status_code == 200
    assert first.json()["token"] != second.json()["token"]
    assert first.json()["name"].startswith("token-") and first.json()["read_only"] is False
    expires_at = (datetime.now(UTC) + timedelta(days=1)).replace(microsecond=0)
    named = client.post(
        "/api/v1/auth/token/",
        {**login, "name": "backup-job", "expires_at": expires_at.isoformat(), "read_only": True},
        content_type="application/json",
    ).json()
    assert named["name"] == "backup-job" and named["read_only"] is True
    assert datetime.fromisoformat(named["expires_at"]) == expires_at
    again = client.post(
        "/api/v1/auth/token/", {**login, "name": "backup-job"}, content_type="application/json"
    )
    assert again.status_code == 400 and "name" in again.json()["error"]["fields"]
    assert sorted(user.api_tokens.values_list("name", flat=True))[0] == "backup-job"
    assert bearer(named["token"]).post("/api/v1/tokens/", {"name": "x"}, format="json").status_code == 403
