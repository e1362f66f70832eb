"""Members: who may be added, the last admin and a personal project's owner stay, a member leaves."""

from typing import Any

import pytest

from apps.projects.models import Membership, Project
from tests.apps.projects.conftest import Team

pytestmark = pytest.mark.django_db


def _roles(project_id: int) -> dict[str, str]:
    return dict(Membership.objects.filter(project_id=project_id).values_list("user__username", "role"))


def test_members_are_listed_with_username_and_role(team: Team) -> None:
    response = team.clients["reader"].get(team.url("members/"))
    assert response.status_code == 200
    rows = {row["username"]: (row["user_id"], row["role"]) for row in response.json()["results"]}
    assert rows == {
        "alice": (team.users["admin"].pk, "admin"),
        "carol": (team.users["member"].pk, "member"),
        "dave": (team.users["reader"].pk, "reader"),
        "frank": (team.users["second_reader"].pk, "reader"),
    }


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"user": "nobody"}, "user"),
        ({"user": 999999}, "user"),
        ({"user": ""}, "user"),
        ({"user": ["alice"]}, "user"),
        ({"user": "erin", "role": "owner"}, "role"),
        ({"user": "erin", "colour": "red"}, "colour"),
        ({}, "user"),
    ],
)
def test_bad_member_input_is_400_naming_the_field(team: Team, make_user: Any, body: Any, field: str) -> None:
    make_user("erin")
    response = team.clients["admin"].post(team.url("members/"), body, format="json")
    assert response.status_code == 400, response.content
    assert field in response.json()["error"]["fields"]
    assert len(_roles(team.project_id)) == 4


def test_an_inactive_user_cannot_be_added(team: Team, make_user: Any) -> None:
    erin = make_user("erin")
    erin.is_active = False
    erin.save()
    response = team.clients["admin"].post(team.url("members/"), {"user": "erin"}, format="json")
    assert response.status_code == 400 and "erin" in response.json()["error"]["message"]


def test_a_member_added_twice_is_409(team: Team) -> None:
    response = team.clients["admin"].post(team.url("members/"), {"user": "carol"}, format="json")
    assert response.status_code == 409 and response.json()["error"]["code"] == "conflict"
    assert _roles(team.project_id)["carol"] == "member"


def test_a_user_is_added_by_id_as_member_unless_a_role_is_given(team: Team, make_user: Any) -> None:
    erin = make_user("erin")
    response = team.clients["admin"].post(team.url("members/"), {"user": str(erin.pk)}, format="json")
    assert response.status_code == 201 and response.json()["role"] == "member"


def test_the_last_admin_is_neither_demoted_nor_removed(team: Team) -> None:
    alice = team.users["admin"].pk
    demote = team.clients["admin"].patch(team.url(f"members/{alice}/"), {"role": "member"}, format="json")
    assert demote.status_code == 409 and "last admin" in demote.json()["error"]["message"]
    for client in (team.clients["admin"], team.clients["staff"]):  # not by leaving, not by staff
        assert client.delete(team.url(f"members/{alice}/")).status_code == 409
    assert _roles(team.project_id)["alice"] == "admin"
    promoted = team.clients["admin"].patch(
        team.url(f"members/{team.users['member'].pk}/"), {"role": "admin"}, format="json"
    )
    assert promoted.status_code == 200
    assert team.clients["admin"].delete(team.url(f"members/{alice}/")).status_code == 204  # alice leaves
    assert _roles(team.project_id) == {"carol": "admin", "dave": "reader", "frank": "reader"}
    assert team.clients["admin"].get(team.url()).status_code == 404


def test_a_member_leaves_on_their_own_but_removes_no_one_else(team: Team) -> None:
    reader = team.clients["reader"]
    other = team.users["second_reader"].pk
    assert reader.delete(team.url(f"members/{other}/")).status_code == 403
    assert reader.delete(team.url(f"members/{team.users['reader'].pk}/")).status_code == 204
    assert "dave" not in _roles(team.project_id)
    assert reader.get(team.url()).status_code == 404


def test_an_unknown_member_is_404(team: Team) -> None:
    outsider = team.users["outsider"].pk
    admin = team.clients["admin"]
    assert admin.delete(team.url(f"members/{outsider}/")).status_code == 404
    assert admin.patch(team.url(f"members/{outsider}/"), {"role": "admin"}, format="json").status_code == 404
    assert admin.delete(team.url("members/abc/")).status_code == 404


def test_the_owner_of_a_personal_project_stays_its_admin(team: Team) -> None:
    alice = team.users["admin"]
    personal = Project.objects.get(personal_of=alice)
    url = f"/api/v1/projects/{personal.pk}/members/"
    alice_api = team.clients["admin"]
    assert alice_api.post(url, {"user": "carol", "role": "admin"}, format="json").status_code == 201
    carol_api = team.clients["member"]  # an admin of alice's personal project now
    assert carol_api.delete(f"{url}{alice.pk}/").status_code == 409
    assert carol_api.patch(f"{url}{alice.pk}/", {"role": "reader"}, format="json").status_code == 409
    assert alice_api.delete(f"{url}{alice.pk}/").status_code == 409
    assert team.clients["staff"].delete(f"{url}{alice.pk}/").status_code == 409
    assert _roles(personal.pk) == {"alice": "admin", "carol": "admin"}
    assert carol_api.delete(f"{url}{team.users['member'].pk}/").status_code == 204  # carol leaves


def test_staff_manage_members_of_any_project(team: Team) -> None:
    staff = team.clients["staff"]
    assert (
        staff.post(team.url("members/"), {"user": "bob", "role": "admin"}, format="json").status_code == 201
    )
    assert (
        staff.patch(
            team.url(f"members/{team.users['admin'].pk}/"), {"role": "reader"}, format="json"
        ).status_code
        == 200
    )
    assert _roles(team.project_id)["bob"] == "admin" and _roles(team.project_id)["alice"] == "reader"
