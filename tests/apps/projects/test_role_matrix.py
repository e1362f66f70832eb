"""Every project endpoint and method, for each role: exactly what the role allows.

Readers, members and admins of the project, a member of another project, staff and an anonymous
client call each operation on the same fresh team; the status says whether it was allowed, and a
refused call changed nothing.
"""

import re
from typing import Any

import pytest

from apps.projects.models import Membership, Project
from tests.apps.projects.conftest import ROLES, Team
from tests.security.test_tenant_isolation import PROJECT_ADMINISTRATION, _schema_operations

pytestmark = pytest.mark.django_db

LIMITS = {"max_vms": 7, "max_vcpus": 70, "max_memory_mb": 7000}

# (name, method, path under the team's URL, body, the status of each role in ROLES' order)
OPERATIONS: list[tuple[str, str, str, Any, tuple[int, ...]]] = [
    ("read project", "get", "", None, (200, 200, 200, 404, 200, 401)),
    ("describe project", "patch", "", {"description": "ours"}, (200, 403, 403, 404, 200, 401)),
    ("delete project", "delete", "", None, (204, 403, 403, 404, 204, 401)),
    ("list members", "get", "members/", None, (200, 200, 200, 404, 200, 401)),
    ("add member", "post", "members/", {"user": "erin", "role": "reader"}, (201, 403, 403, 404, 201, 401)),
    ("change role", "patch", "members/{member}/", {"role": "reader"}, (200, 403, 403, 404, 200, 401)),
    ("remove member", "delete", "members/{second_reader}/", None, (204, 403, 403, 404, 204, 401)),
    ("read quota", "get", "quota/", None, (200, 200, 200, 404, 200, 401)),
    ("set quota", "put", "quota/", LIMITS, (403, 403, 403, 404, 200, 401)),
    ("change quota", "patch", "quota/", {"max_vms": 7}, (403, 403, 403, 404, 200, 401)),
]


def test_the_matrix_covers_every_method_of_every_project_endpoint() -> None:
    in_schema = {(path, method) for path, method in _schema_operations() if path in PROJECT_ADMINISTRATION}
    covered = {
        ("/api/v1/projects/{id}/" + re.sub(r"\{\w+\}", "{user_id}", tail), method)
        for _, method, tail, _, _ in OPERATIONS
    }
    assert in_schema == covered
    assert set(PROJECT_ADMINISTRATION) == {path for path, _ in in_schema}


def _state(team: Team) -> tuple[Any, ...]:
    """What any of the operations changes."""
    project = Project.objects.filter(pk=team.project_id).values().first()
    members = sorted(Membership.objects.filter(project_id=team.project_id).values_list("user_id", "role"))
    return project, members


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize(("operation", "method", "tail", "body", "statuses"), OPERATIONS, ids=lambda v: v)
def test_each_role_gets_exactly_what_it_allows(
    team: Team, make_user: Any, role: str, operation: str, method: str, tail: str, body: Any, statuses: Any
) -> None:
    make_user("erin")
    path = team.url(tail.format(**{name: user.pk for name, user in team.users.items()}))
    before = _state(team)
    client = team.clients[role]
    response = client.get(path) if method == "get" else getattr(client, method)(path, body, format="json")
    expected = dict(zip(ROLES, statuses, strict=True))[role]
    assert response.status_code == expected, (operation, role, response.content)
    if expected >= 400:
        assert set(response.json()) == {"error"}
        assert _state(team) == before
        if expected == 404:  # never confirms that the project exists
            assert "team" not in response.content.decode()


@pytest.mark.parametrize("role", ROLES)
def test_the_project_list_holds_the_callers_projects_with_their_role(team: Team, role: str) -> None:
    response = team.clients[role].get("/api/v1/projects/")
    if role == "anonymous":
        assert response.status_code == 401
        return
    assert response.status_code == 200
    roles = {row["name"]: row["role"] for row in response.json()["results"]}
    expected = {
        "admin": {"team": "admin", "~alice": "admin"},
        "member": {"team": "member", "~carol": "admin"},
        "reader": {"team": "reader", "~dave": "admin"},
        "outsider": {"other": "admin", "~bob": "admin"},
    }
    if role == "staff":  # every project, with the staff user's role (none here) or null
        assert roles["team"] is None and roles["other"] is None
        assert set(roles) == set(Project.objects.values_list("name", flat=True))
    else:
        assert roles == expected[role]


@pytest.mark.parametrize("role", [role for role in ROLES if role != "anonymous"])
def test_any_user_creates_a_team_project_and_becomes_its_admin(team: Team, role: str) -> None:
    response = team.clients[role].post(
        "/api/v1/projects/", {"name": f"new-{role}", "description": "d"}, format="json"
    )
    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["name"], body["description"], body["role"], body["personal_of"]) == (
        f"new-{role}",
        "d",
        "admin",
        None,
    )
    project = Project.objects.get(pk=body["id"])
    assert {
        "max_vms": project.max_vms,
        "max_vcpus": project.max_vcpus,
        "max_memory_mb": project.max_memory_mb,
        "max_networks": project.max_networks,
    } == Project.default_quota()
    assert list(project.memberships.values_list("user__username", "role")) == [
        (team.users[role].username, "admin")
    ]


def test_an_anonymous_client_cannot_create_a_project(team: Team) -> None:
    assert (
        team.clients["anonymous"].post("/api/v1/projects/", {"name": "x"}, format="json").status_code == 401
    )
    assert not Project.objects.filter(name="x").exists()
