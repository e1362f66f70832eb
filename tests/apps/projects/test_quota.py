"""A project's quota through the API: read by members, written by staff, in effect for the next create."""

from typing import Any

import pytest

from apps.projects.models import Project
from apps.projects.services import QUOTA_LIMIT_MAX
from tests.apps.projects.conftest import Team
from tests.conftest import vm_payload

pytestmark = pytest.mark.django_db


def _create(team: Team, name: str, **extra: Any) -> Any:
    return team.clients["member"].post(
        "/api/v1/vms/", vm_payload(name=name, **extra), format="json", HTTP_X_PROJECT=str(team.project_id)
    )


def test_the_quota_shows_limits_and_usage(team: Team, node: Any, image: Any) -> None:
    assert _create(team, "web-1", vcpus=3, memory_mb=512).status_code == 202
    response = team.clients["reader"].get(team.url("quota/"))
    assert response.status_code == 200
    assert response.json() == {
        "limits": Project.default_quota(),
        "usage": {"vms": 1, "vcpus": 3, "memory_mb": 512, "networks": 1},  # its default network
    }


def test_a_quota_raised_by_staff_lets_the_next_create_through(team: Team, node: Any, image: Any) -> None:
    staff = team.clients["staff"]
    lowered = staff.patch(team.url("quota/"), {"max_vms": 1}, format="json")
    assert lowered.status_code == 200 and lowered.json()["limits"]["max_vms"] == 1
    assert _create(team, "web-1").status_code == 202
    refused = _create(team, "web-2")
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "quota_exceeded"
    raised = staff.patch(team.url("quota/"), {"max_vms": 2}, format="json")
    assert raised.json() == {
        "limits": {**Project.default_quota(), "max_vms": 2},
        "usage": {"vms": 1, "vcpus": 2, "memory_mb": 1024, "networks": 1},
    }
    assert _create(team, "web-2").status_code == 202


def test_a_limit_below_the_usage_is_allowed_and_refuses_new_creates(
    team: Team, node: Any, image: Any
) -> None:
    for name in ("web-1", "web-2"):
        assert _create(team, name).status_code == 202
    limits = {"max_vms": 10, "max_vcpus": 1, "max_memory_mb": 100}
    response = team.clients["staff"].put(team.url("quota/"), limits, format="json")
    assert response.status_code == 200
    assert response.json() == {
        "limits": {**limits, "max_networks": Project.default_quota()["max_networks"]},  # left as it was
        "usage": {"vms": 2, "vcpus": 4, "memory_mb": 2048, "networks": 1},
    }
    refused = _create(team, "web-3", vcpus=1, memory_mb=64)
    assert refused.status_code == 403 and "vCPUs 4+1 > 1" in refused.json()["error"]["message"]


def test_the_quota_of_a_personal_project_is_set_the_same_way(team: Team, node: Any, image: Any) -> None:
    personal = Project.objects.get(personal_of=team.users["admin"])
    url = f"/api/v1/projects/{personal.pk}/quota/"
    assert team.clients["admin"].patch(url, {"max_vms": 0}, format="json").status_code == 403  # its admin
    assert team.clients["staff"].patch(url, {"max_vms": 0}, format="json").status_code == 200
    refused = team.clients["admin"].post(
        "/api/v1/vms/", vm_payload(), format="json"
    )  # no X-Project: personal
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "quota_exceeded"


@pytest.mark.parametrize(
    ("method", "body", "field"),
    [
        ("patch", {"max_vms": -1}, "max_vms"),
        ("patch", {"max_vcpus": QUOTA_LIMIT_MAX["max_vcpus"] + 1}, "max_vcpus"),
        ("patch", {"max_memory_mb": "lots"}, "max_memory_mb"),
        ("patch", {"max_vms": 1.5}, "max_vms"),
        ("patch", {"max_vms": None}, "max_vms"),
        ("patch", {"max_disks": 3}, "max_disks"),
        ("patch", {}, None),
        ("put", {"max_vms": 5}, "max_vcpus"),
        ("put", {"limits": {"max_vms": 5}}, "limits"),
    ],
)
def test_bad_limits_are_400_and_change_nothing(team: Team, method: str, body: Any, field: str | None) -> None:
    response = getattr(team.clients["staff"], method)(team.url("quota/"), body, format="json")
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["code"] == "invalid" and error["message"]
    if field is not None:
        assert field in error["fields"]
    project = Project.objects.get(pk=team.project_id)
    assert project.max_vms == Project.default_quota()["max_vms"]


def test_the_largest_limits_are_accepted(team: Team) -> None:
    response = team.clients["staff"].put(team.url("quota/"), QUOTA_LIMIT_MAX, format="json")
    assert response.status_code == 200 and response.json()["limits"] == QUOTA_LIMIT_MAX
