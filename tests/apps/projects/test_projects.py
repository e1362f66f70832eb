"""Projects themselves: names, personal projects, deletion."""

from typing import Any

import pytest

from apps.migrations.models import Migration
from apps.projects.models import Membership, Project
from apps.vms.models import VM, BatchOperation
from tests.apps.projects.conftest import Team
from tests.conftest import vm_payload

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "~mine"}, "name"),
        ({"name": "Team"}, "name"),
        ({"name": "-team"}, "name"),
        ({"name": "a b"}, "name"),
        ({"name": "x" * 64}, "name"),
        ({"name": ""}, "name"),
        ({"name": ["team-x"]}, "name"),
        ({}, "name"),
        ({"name": "ok", "description": "d" * 501}, "description"),
        ({"name": "ok", "quota": 3}, "quota"),
    ],
)
def test_bad_project_input_is_400_naming_the_field(team: Team, body: Any, field: str) -> None:
    response = team.clients["member"].post("/api/v1/projects/", body, format="json")
    assert response.status_code == 400, response.content
    assert field in response.json()["error"]["fields"]
    assert set(Project.objects.filter(personal_of=None).values_list("name", flat=True)) == {"team", "other"}


def test_a_taken_name_is_400_with_a_message(team: Team) -> None:
    response = team.clients["member"].post("/api/v1/projects/", {"name": "other"}, format="json")
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "A project named 'other' already exists."
    rename = team.clients["admin"].patch(team.url(), {"name": "other"}, format="json")
    assert rename.status_code == 400 and "already exists" in rename.json()["error"]["message"]


def test_an_admin_renames_a_team_project_and_vm_bodies_follow(team: Team, node: Any, image: Any) -> None:
    headers: dict[str, Any] = {"HTTP_X_PROJECT": str(team.project_id)}
    vm_id = team.clients["member"].post("/api/v1/vms/", vm_payload(), format="json", **headers).json()["id"]
    assert team.clients["member"].get(f"/api/v1/vms/{vm_id}/", **headers).json()["project"] == "team"
    renamed = team.clients["admin"].patch(
        team.url(), {"name": "blue-team", "description": "d"}, format="json"
    )
    assert renamed.status_code == 200, renamed.content
    assert (renamed.json()["name"], renamed.json()["description"]) == ("blue-team", "d")
    assert team.clients["member"].get(f"/api/v1/vms/{vm_id}/", **headers).json()["project"] == "blue-team"
    listed = team.clients["member"].get("/api/v1/vms/", HTTP_X_PROJECT="blue-team").json()["results"]
    assert [row["project"] for row in listed] == ["blue-team"]


def test_a_personal_project_keeps_its_name_and_is_not_deleted(team: Team) -> None:
    personal = Project.objects.get(personal_of=team.users["admin"])
    url = f"/api/v1/projects/{personal.pk}/"
    alice = team.clients["admin"]
    assert alice.get(url).json()["personal_of"] == team.users["admin"].pk
    rename = alice.patch(url, {"name": "mine"}, format="json")
    assert (
        rename.status_code == 400
        and rename.json()["error"]["message"] == "A personal project keeps its name."
    )
    assert alice.patch(url, {"description": "my own"}, format="json").status_code == 200
    for client in (alice, team.clients["staff"]):
        refused = client.delete(url)
        assert refused.status_code == 409 and "personal" in refused.json()["error"]["message"]
    assert Project.objects.get(pk=personal.pk).name == "~alice"


def test_a_project_with_vms_is_not_deleted_until_they_are(
    team: Team, node: Any, make_node: Any, image: Any
) -> None:
    headers: dict[str, Any] = {"HTTP_X_PROJECT": str(team.project_id)}
    member = team.clients["member"]
    vm_id = member.post("/api/v1/vms/", vm_payload(), format="json", **headers).json()["id"]
    batch = member.post("/api/v1/vms/batch/", {"vms": [vm_payload(name="b-1")]}, format="json", **headers)
    assert batch.status_code == 202, batch.content
    refused = team.clients["admin"].delete(team.url())
    assert refused.status_code == 409
    assert (
        refused.json()["error"]["message"]
        == "The project still has 2 VM(s) that are not deleted; delete them first."
    )
    vm = VM.objects.get(pk=vm_id)
    Migration.objects.create(
        vm=vm,
        source_node=node,
        dest_node=make_node("node2"),
        mode="cold",
        requested_by=team.users["member"],
        vm_state_before="stopped",
    )
    VM.objects.filter(project_id=team.project_id).update(state="deleted")  # as the nodes report it
    records = "/api/v1/vms/?state=deleted"
    staff = team.clients["staff"]
    assert len(staff.get(records).json()["results"]) == 2  # and cached
    assert team.clients["admin"].delete(team.url()).status_code == 204
    assert staff.get(records).json()["results"] == []  # not the cached records
    assert not Project.objects.filter(pk=team.project_id).exists()
    assert not VM.objects.filter(pk=vm_id).exists() and not Migration.objects.exists()
    assert not BatchOperation.objects.filter(pk=batch.json()["batch"]["id"]).exists()
    assert not Membership.objects.filter(project_id=team.project_id).exists()
    assert member.get("/api/v1/vms/", **headers).status_code == 404


def test_ids_that_are_not_numbers_are_404(team: Team) -> None:
    for path in ("/api/v1/projects/team/", "/api/v1/projects/1x/quota/", "/api/v1/projects/x/members/"):
        assert team.clients["staff"].get(path).status_code == 404


@pytest.mark.parametrize("tail", ["", "members/", "quota/"])
def test_the_browsable_api_renders_the_project_pages(team: Team, tail: str) -> None:
    for role in ("admin", "staff"):
        page = team.clients[role].get(team.url(tail), HTTP_ACCEPT="text/html")
        assert page.status_code == 200 and b"<form" in page.content
    assert team.clients["admin"].get("/api/v1/projects/", HTTP_ACCEPT="text/html").status_code == 200
