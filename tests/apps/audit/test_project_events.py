"""Events carry the project acted in: a member's, named by X-Project, and staff's acting on the
whole fleet (the project of what they acted on), so that the project's admins read them all."""

from typing import Any

import pytest

from apps.audit.models import AuditEvent
from apps.projects.models import Membership, Project, Role
from tests.conftest import vm_payload

pytestmark = pytest.mark.django_db


@pytest.fixture
def team(user: Any, node: Any, image: Any) -> Project:
    project = Project.objects.create(name="team", **Project.default_quota())
    Membership.objects.create(project=project, user=user, role=Role.ADMIN)
    return project


def test_a_members_and_staffs_changes_to_a_project_vm_are_in_the_projects_trail(api, staff_api, team):
    api.defaults["HTTP_X_PROJECT"] = "team"
    vm = api.post("/api/v1/vms/", vm_payload(name="shared"), format="json").json()
    assert staff_api.patch(f"/api/v1/vms/{vm['id']}/", {"name": "renamed"}, format="json").status_code == 200
    events = AuditEvent.objects.filter(target_id=vm["id"]).order_by("timestamp")
    assert [(event.action, event.project_id) for event in events] == [
        ("vm.create", team.pk),
        ("vm.update", team.pk),  # staff named no project: the VM's
    ]
    seen = api.get(f"/api/v1/audit/?project={team.pk}").json()["results"]
    assert {event["action"] for event in seen} == {"vm.create", "vm.update"}
