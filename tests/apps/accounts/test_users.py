"""User management through the API: staff create, list, change, deactivate and reset passwords;
everyone else gets 403; ``users/me/`` still answers every user."""

import pytest

from tests.apps.accounts.conftest import bearer

pytestmark = pytest.mark.django_db

STRONG = "tall-granite-harbour-42"


def _login(client, username: str, password: str):
    return client.post(
        "/api/v1/auth/token/", {"username": username, "password": password}, content_type="application/json"
    )


def test_staff_create_list_read_and_change_users(staff_api, user, client):
    response = staff_api.post(
        "/api/v1/users/",
        {"username": "carol", "password": STRONG, "email": "carol@example.com", "is_staff": False},
        format="json",
    )
    assert response.status_code == 201, response.content
    carol = response.json()
    assert carol["username"] == "carol" and carol["is_active"] and "password" not in carol
    names = [row["username"] for row in staff_api.get("/api/v1/users/").json()["results"]]
    assert names == sorted(names) and {"alice", "carol", "operator"} <= set(names)
    assert [row["username"] for row in staff_api.get("/api/v1/users/?is_staff=true").json()["results"]] == [
        "operator"
    ]
    assert staff_api.get(f"/api/v1/users/{carol['id']}/").json() == carol
    changed = staff_api.patch(f"/api/v1/users/{carol['id']}/", {"email": "c@example.org"}, format="json")
    assert changed.status_code == 200 and changed.json()["email"] == "c@example.org"
    assert _login(client, "carol", STRONG).status_code == 200


def test_users_are_staff_only_and_me_answers_everyone(api, user, staff):
    paths = [
        ("get", "/api/v1/users/", None),
        ("post", "/api/v1/users/", {"username": "mallory", "password": STRONG}),
        ("get", f"/api/v1/users/{staff.pk}/", None),
        ("patch", f"/api/v1/users/{user.pk}/", {"is_staff": True}),
        ("post", f"/api/v1/users/{staff.pk}/password/", {"password": STRONG}),
    ]
    for method, path, body in paths:
        response = getattr(api, method)(path, body, format="json")
        assert response.status_code == 403, (method, path, response.content)
        assert response.json()["error"]["message"] == "Only staff may manage users."
    user.refresh_from_db()
    assert not user.is_staff
    me = api.get("/api/v1/users/me/")
    assert me.status_code == 200 and me.json()["username"] == "alice"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"username": "dave", "password": "short"}, "password"),
        ({"username": "dave", "password": "password123"}, "password"),
        ({"username": "davidsmith", "password": "davidsmith1"}, "password"),
        ({"username": "alice", "password": STRONG}, "username"),
        ({"username": "bad name!", "password": STRONG}, "username"),
        ({"username": "dave", "password": STRONG, "email": "not-an-email"}, "email"),
        ({"username": "dave", "password": STRONG, "role": "god"}, "role"),
        ({"password": STRONG}, "username"),
    ],
)
def test_bad_users_are_400_with_a_message(staff_api, user, body, field):
    response = staff_api.post("/api/v1/users/", body, format="json")
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["code"] == "invalid" and error["message"] and field in error["fields"], error


def test_a_password_reset_refuses_the_old_password(staff_api, user, client):
    response = staff_api.post(f"/api/v1/users/{user.pk}/password/", {"password": STRONG}, format="json")
    assert response.status_code == 204, response.content
    old = _login(client, "alice", "pw-correct-horse")
    assert old.status_code == 400 and old.json()["error"]["code"] == "invalid"
    assert _login(client, "alice", STRONG).status_code == 200
    weak = staff_api.post(f"/api/v1/users/{user.pk}/password/", {"password": "123"}, format="json")
    assert weak.status_code == 400 and "password" in weak.json()["error"]["fields"]
    assert (
        staff_api.post("/api/v1/users/999999/password/", {"password": STRONG}, format="json").status_code
        == 404
    )


def test_a_password_reset_may_revoke_every_token_of_the_user(staff_api, api, user):
    assert api.get("/api/v1/vms/").status_code == 200
    kept = staff_api.post(f"/api/v1/users/{user.pk}/password/", {"password": STRONG}, format="json")
    assert kept.status_code == 204 and api.get("/api/v1/vms/").status_code == 200
    revoked = staff_api.post(
        f"/api/v1/users/{user.pk}/password/", {"password": STRONG + "!", "revoke_tokens": True}, format="json"
    )
    assert revoked.status_code == 204
    assert api.get("/api/v1/vms/").status_code == 401
    assert not user.api_tokens.exists()


def test_a_deactivated_user_cannot_log_in_until_reactivated(staff_api, user, client):
    staff_api.patch(f"/api/v1/users/{user.pk}/", {"is_active": False}, format="json")
    assert _login(client, "alice", "pw-correct-horse").status_code == 400
    staff_api.patch(f"/api/v1/users/{user.pk}/", {"is_active": True}, format="json")
    secret = _login(client, "alice", "pw-correct-horse").json()["token"]
    assert bearer(secret).get("/api/v1/users/me/").status_code == 200


def test_staff_cannot_lock_themselves_out(staff_api, staff):
    for body in ({"is_active": False}, {"is_staff": False}):
        response = staff_api.patch(f"/api/v1/users/{staff.pk}/", body, format="json")
        assert response.status_code == 400, response.content
        assert next(iter(body)) in response.json()["error"]["fields"]
    staff.refresh_from_db()
    assert staff.is_active and staff.is_staff


def test_users_are_changed_by_patch_only_and_never_deleted(staff_api, user):
    assert staff_api.put(f"/api/v1/users/{user.pk}/", {"email": "a@b.c"}, format="json").status_code == 405
    assert staff_api.delete(f"/api/v1/users/{user.pk}/").status_code == 405
    bad = staff_api.patch(f"/api/v1/users/{user.pk}/", {"username": "renamed"}, format="json")
    assert bad.status_code == 400 and "username" in bad.json()["error"]["fields"]


def test_the_browsable_api_offers_the_forms(api, staff_api):
    tokens = api.get("/api/v1/tokens/", HTTP_ACCEPT="text/html")
    assert tokens.status_code == 200 and 'name="read_only"' in tokens.content.decode()
    users = staff_api.get("/api/v1/users/", HTTP_ACCEPT="text/html")
    assert users.status_code == 200 and 'name="password"' in users.content.decode()
