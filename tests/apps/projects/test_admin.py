"""The projects' admin pages: they render, staff edit quotas and members there, and the API's rules
hold (a project keeps an admin, a personal project its owner and its name, quota bounds)."""

from typing import Any

import pytest
import redis
from django.conf import settings

from apps.audit.models import AuditEvent
from apps.core.authentication import token_memo_key
from apps.projects.models import Membership, Project
from apps.projects.services import QUOTA_LIMIT_MAX
from tests.apps.projects.conftest import Team
from tests.conftest import TokenClient

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client(client: Any, team: Team) -> Any:
    client.force_login(team.users["staff"])
    return client


def _change_form(project: Project, *, roles: dict[int, str] | None = None, **fields: Any) -> dict[str, Any]:
    """The POST of ``project``'s change page: its fields (``fields`` replacing some) and its
    memberships, each with the role in ``roles`` (``"DELETE"``: ticked for deletion)."""
    memberships = list(Membership.objects.filter(project=project).order_by("pk"))
    data: dict[str, Any] = {
        "name": project.name,
        "description": project.description,
        **{field: getattr(project, field) for field in QUOTA_LIMIT_MAX},
        **fields,
        "memberships-TOTAL_FORMS": len(memberships),
        "memberships-INITIAL_FORMS": len(memberships),
        "memberships-MIN_NUM_FORMS": 0,
        "memberships-MAX_NUM_FORMS": 1000,
    }
    for index, membership in enumerate(memberships):
        role = (roles or {}).get(membership.user_id, membership.role)
        prefix = f"memberships-{index}-"
        data |= {
            f"{prefix}id": membership.pk,
            f"{prefix}project": project.pk,
            f"{prefix}user": membership.user_id,
        }
        data[f"{prefix}role"] = membership.role if role == "DELETE" else role
        if role == "DELETE":
            data[f"{prefix}DELETE"] = "on"
    return data


@pytest.mark.parametrize(
    "path",
    [
        "/admin/projects/project/",
        "/admin/projects/project/?kind=team",
        "/admin/projects/project/?kind=personal",
        "/admin/projects/project/?q=team",
        "/admin/projects/project/add/",
        "/admin/projects/membership/",
        "/admin/projects/membership/?role__exact=reader&q=dave",
    ],
)
def test_the_pages_render(admin_client: Any, path: str) -> None:
    response = admin_client.get(path)
    assert response.status_code == 200


def test_the_change_pages_show_quota_and_members(admin_client: Any, team: Team) -> None:
    page = admin_client.get(f"/admin/projects/project/{team.project_id}/change/").content.decode()
    assert 'name="max_vms"' in page and 'name="memberships-0-role"' in page
    personal = Project.objects.get(personal_of=team.users["admin"])
    page = admin_client.get(f"/admin/projects/project/{personal.pk}/change/").content.decode()
    assert 'name="name"' not in page  # a personal project keeps its name
    assert admin_client.get(f"/admin/projects/project/{personal.pk}/delete/").status_code == 403


def test_staff_edit_a_quota_within_its_bounds(admin_client: Any, team: Team) -> None:
    project = Project.objects.get(pk=team.project_id)
    url = f"/admin/projects/project/{project.pk}/change/"
    refused = admin_client.post(url, _change_form(project, max_vms=QUOTA_LIMIT_MAX["max_vms"] + 1))
    assert refused.status_code == 200 and "At most" in refused.content.decode()
    assert admin_client.post(url, _change_form(project, max_vms=9)).status_code == 302
    assert Project.objects.get(pk=project.pk).max_vms == 9
    quota = team.clients["reader"].get(team.url("quota/")).json()
    assert quota["limits"]["max_vms"] == 9
    (event,) = AuditEvent.objects.filter(action="quota.update", project_id=project.pk)
    assert event.detail["via"] == "admin" and event.detail["values"]["max_vms"] == 9


def test_the_last_admin_stays_in_the_admin_too(admin_client: Any, team: Team) -> None:
    project = Project.objects.get(pk=team.project_id)
    url = f"/admin/projects/project/{project.pk}/change/"
    for change in ("DELETE", "reader"):
        response = admin_client.post(url, _change_form(project, roles={team.users["admin"].pk: change}))
        assert (
            response.status_code == 200 and "A project needs at least one admin." in response.content.decode()
        )
    personal = Project.objects.get(personal_of=team.users["admin"])
    response = admin_client.post(
        f"/admin/projects/project/{personal.pk}/change/",
        _change_form(personal, roles={team.users["admin"].pk: "reader"}),
    )
    assert "The owner of a personal project stays its admin." in response.content.decode()
    assert Membership.objects.get(project=project, user=team.users["admin"]).role == "admin"


def test_a_membership_changed_in_the_admin_drops_the_members_token_memo(
    admin_client: Any, team: Team
) -> None:
    carol = team.users["member"]
    team.settled()
    team.clients["member"].get("/api/v1/vms/")  # authenticates: her token's memo is stored
    client = team.clients["member"]
    assert isinstance(client, TokenClient)
    memo = token_memo_key(client.token_secret)
    store = redis.Redis.from_url(settings.REDIS_URL)
    assert store.hget(memo, "user_id") == str(carol.pk).encode()
    project = Project.objects.get(pk=team.project_id)
    response = admin_client.post(
        f"/admin/projects/project/{project.pk}/change/", _change_form(project, roles={carol.pk: "DELETE"})
    )
    assert response.status_code == 302
    assert store.hget(memo, "user_id") is None  # gone (a tombstone in its place)
    (removed,) = AuditEvent.objects.filter(action="member.remove", project_id=project.pk)
    assert (removed.target_id, removed.detail["via"]) == (str(carol.pk), "admin")
    assert team.clients["member"].get("/api/v1/vms/", HTTP_X_PROJECT=str(project.pk)).status_code == 404


def test_quotas_edited_in_the_list_keep_their_bounds(admin_client: Any, team: Team) -> None:
    project = Project.objects.get(pk=team.project_id)

    def save(max_vms: int) -> Any:
        form = {
            "form-TOTAL_FORMS": 1,
            "form-INITIAL_FORMS": 1,
            "form-0-id": project.pk,
            **{f"form-0-{field}": getattr(project, field) for field in QUOTA_LIMIT_MAX},
            "form-0-max_vms": max_vms,
            "_save": "Save",
        }
        return admin_client.post("/admin/projects/project/?kind=team&q=team", form)

    assert save(QUOTA_LIMIT_MAX["max_vms"] + 1).status_code == 200  # the list again, with the error
    assert Project.objects.get(pk=project.pk).max_vms == project.max_vms
    assert save(12).status_code == 302
    assert Project.objects.get(pk=project.pk).max_vms == 12
