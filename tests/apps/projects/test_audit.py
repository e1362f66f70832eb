"""Project, membership and quota changes are in the audit trail, in the project they change, with
the actor and the member or project acted on; refused attempts too."""

from typing import Any

import pytest

from apps.audit.models import AuditEvent
from tests.apps.projects.conftest import Team

pytestmark = pytest.mark.django_db


def _events(team: Team) -> list[tuple[str, str, str, str, int]]:
    rows = AuditEvent.objects.filter(project_id=team.project_id).order_by("timestamp", "id")
    return [(row.action, row.actor_name, row.target_id, row.outcome, row.status) for row in rows]


def test_member_and_quota_changes_are_audited_in_the_project(team: Team, make_user: Any) -> None:
    erin = make_user("erin")
    AuditEvent.objects.all().delete()  # the fixture's own changes
    admin, staff, reader = team.clients["admin"], team.clients["staff"], team.clients["reader"]
    admin.post(team.url("members/"), {"user": "erin", "role": "reader"}, format="json")
    admin.patch(team.url(f"members/{erin.pk}/"), {"role": "member"}, format="json")
    reader.put(team.url("quota/"), {"max_vms": 1, "max_vcpus": 1, "max_memory_mb": 1}, format="json")
    staff.patch(team.url("quota/"), {"max_vms": 3}, format="json")
    admin.patch(team.url(), {"description": "ours"}, format="json")
    admin.delete(team.url(f"members/{erin.pk}/"))
    assert _events(team) == [
        ("member.add", "alice", str(erin.pk), "ok", 201),
        ("member.update", "alice", str(erin.pk), "ok", 200),
        ("quota.update", "dave", str(team.project_id), "refused", 403),
        ("quota.update", "operator", str(team.project_id), "ok", 200),
        ("project.update", "alice", str(team.project_id), "ok", 200),
        ("member.remove", "alice", str(erin.pk), "ok", 204),
    ]
    quota = AuditEvent.objects.get(action="quota.update", outcome="ok")
    assert quota.detail["values"] == {"max_vms": 3} and quota.project_name == "team"


def test_a_project_made_or_deleted_is_audited_in_it(team: Team) -> None:
    made = team.clients["member"].post("/api/v1/projects/", {"name": "blue"}, format="json").json()
    assert team.clients["member"].delete(f"/api/v1/projects/{made['id']}/").status_code == 204
    events = AuditEvent.objects.filter(project_id=made["id"]).order_by("timestamp", "id")
    assert [(event.action, event.actor_name, event.target_id) for event in events] == [
        ("project.create", "carol", str(made["id"])),
        ("project.delete", "carol", str(made["id"])),
    ]
    assert events[0].detail["values"] == {"name": "blue"} and events[1].project_name == ""
