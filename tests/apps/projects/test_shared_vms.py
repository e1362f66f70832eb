"""Members of one project act on the same VMs through the VM API (``X-Project``); a reader sees but
cannot change them; a member taken out or demoted loses that at once, the VM read fast path included."""

from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from apps.vms.models import VM
from tests.apps.projects.conftest import Team
from tests.conftest import vm_payload

pytestmark = pytest.mark.django_db


def _in(team: Team) -> dict[str, Any]:
    return {"HTTP_X_PROJECT": str(team.project_id)}


def _create(team: Team, role: str, name: str) -> Any:
    return team.clients[role].post("/api/v1/vms/", vm_payload(name=name), format="json", **_in(team))


def test_two_members_act_on_the_same_vms(team: Team, node: Any, image: Any) -> None:
    created = _create(team, "member", "shared-1")
    assert created.status_code == 202, created.content
    vm_id = created.json()["id"]
    assert created.json()["project"] == "team" and created.json()["owner"] == "carol"
    renamed = team.clients["admin"].patch(
        f"/api/v1/vms/{vm_id}/", {"name": "shared-renamed"}, format="json", **_in(team)
    )
    assert renamed.status_code == 200, renamed.content
    for role in ("member", "admin", "reader"):
        read = team.clients[role].get(f"/api/v1/vms/{vm_id}/", **_in(team))
        assert (read.status_code, read.json()["name"]) == (200, "shared-renamed")
        listed = team.clients[role].get("/api/v1/vms/", **_in(team))
        assert [row["id"] for row in listed.json()["results"]] == [vm_id]
    # The project can be named by its name too; its VMs are not in anyone's personal project.
    by_name = team.clients["admin"].get("/api/v1/vms/", HTTP_X_PROJECT="team")
    assert [row["id"] for row in by_name.json()["results"]] == [vm_id]
    assert team.clients["member"].get("/api/v1/vms/").json()["results"] == []


def test_a_reader_cannot_create_or_rename_vms(team: Team, node: Any, image: Any) -> None:
    vm_id = _create(team, "member", "web-1").json()["id"]
    refused = _create(team, "reader", "web-2")
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "permission_denied"
    rename = team.clients["reader"].patch(f"/api/v1/vms/{vm_id}/", {"name": "x"}, format="json", **_in(team))
    assert rename.status_code == 403
    assert list(VM.objects.values_list("name", flat=True)) == ["web-1"]


def test_outsiders_see_nothing_of_the_projects_vms(team: Team, node: Any, image: Any) -> None:
    vm_id = _create(team, "member", "web-1").json()["id"]
    outsider = team.clients["outsider"]
    assert outsider.get("/api/v1/vms/", **_in(team)).status_code == 404
    assert outsider.get(f"/api/v1/vms/{vm_id}/", **_in(team)).status_code == 404
    assert outsider.get(f"/api/v1/vms/{vm_id}/").status_code == 404


def _read_list(team: Team, role: str) -> tuple[Any, int]:
    with CaptureQueriesContext(connection) as queries:
        response = team.clients[role].get("/api/v1/vms/", **_in(team))
    return response, len(queries)


def test_a_removed_member_loses_access_at_once_even_to_a_cached_list(
    team: Team, node: Any, image: Any
) -> None:
    _create(team, "member", "web-1")
    team.settled()
    _read_list(team, "member")  # through DRF: the token's memo (with the roles) and the entry stored
    cached, queries = _read_list(team, "member")
    assert cached.status_code == 200 and queries == 0  # answered by the fast path from Redis
    removed = team.clients["admin"].delete(team.url(f"members/{team.users['member'].pk}/"))
    assert removed.status_code == 204
    after, _ = _read_list(team, "member")
    assert after.status_code == 404
    assert _create(team, "member", "web-2").status_code == 404


def test_a_demoted_member_can_read_but_no_longer_create(team: Team, node: Any, image: Any) -> None:
    _read_list(team, "member")
    demoted = team.clients["admin"].patch(
        team.url(f"members/{team.users['member'].pk}/"), {"role": "reader"}, format="json"
    )
    assert demoted.status_code == 200 and demoted.json()["role"] == "reader"
    assert _create(team, "member", "web-1").status_code == 403
    assert _read_list(team, "member")[0].status_code == 200


def test_an_added_member_can_act_at_once(
    team: Team, make_user: Any, client_for: Any, node: Any, image: Any
) -> None:
    erin = make_user("erin")
    erin_api = client_for(erin)
    assert erin_api.get("/api/v1/vms/", **_in(team)).status_code == 404  # her memo: no role in team
    added = team.clients["admin"].post(
        team.url("members/"), {"user": erin.pk, "role": "member"}, format="json"
    )
    assert added.status_code == 201 and added.json()["username"] == "erin"
    assert erin_api.post("/api/v1/vms/", vm_payload(), format="json", **_in(team)).status_code == 202
    assert erin_api.get("/api/v1/vms/", **_in(team)).status_code == 200
