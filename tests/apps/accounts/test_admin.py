"""Admin pages of tokens: no secret on any page, revoking from the list and from the user's page."""

import pytest

from apps.accounts.models import ApiToken
from apps.accounts.services import token_create

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client(client, staff):
    client.force_login(staff)
    return client


def test_token_pages_show_no_secret(admin_client, user):
    issued = token_create(user=user, name="ci")
    pages = [
        "/admin/accounts/apitoken/",
        f"/admin/accounts/apitoken/{issued.token.pk}/change/",
        f"/admin/auth/user/{user.pk}/change/",
    ]
    for page in pages:
        response = admin_client.get(page)
        assert response.status_code == 200, page
        text = response.content.decode()
        assert "ci" in text and issued.token.prefix in text
        assert issued.secret not in text and issued.token.digest not in text
    assert admin_client.get("/admin/accounts/apitoken/add/").status_code == 403


def test_the_revoke_action_revokes(admin_client, user):
    kept, revoked = token_create(user=user, name="kept"), token_create(user=user, name="revoked")
    response = admin_client.post(
        "/admin/accounts/apitoken/", {"action": "revoke", "_selected_action": [revoked.token.pk]}, follow=True
    )
    assert "Revoked 1 token(s)" in response.content.decode()
    assert list(ApiToken.objects.filter(user=user).values_list("name", flat=True)) == ["kept"]
    assert kept.token.pk
