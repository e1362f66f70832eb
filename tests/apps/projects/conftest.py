"""A team project with one user in each role, an outsider with a project of their own, staff and an
anonymous client, all through the real API (PostgreSQL, Redis)."""

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from rest_framework.test import APIClient

from apps.core import authentication
from tests.apps.vms.conftest import forget

ROLES = ("admin", "member", "reader", "outsider", "staff", "anonymous")


@dataclass
class Team:
    """The project ``team`` (``alice`` admin, ``carol`` member, ``dave`` reader, ``frank`` a second
    reader), ``bob`` in his own project ``other``, the staff user ``operator``; ``clients`` by role."""

    project_id: int
    other_project_id: int
    users: dict[str, Any]
    clients: dict[str, APIClient]

    @staticmethod
    def settled() -> None:
        """As ``TOKEN_MEMO_BLOCK`` seconds after the fixture's membership changes: their tombstones,
        which keep tokens' memos from being written (and the fast path from answering), gone, and
        this process's record of the memos it wrote (``TOKEN_MEMO_REFRESH``) expired."""
        forget("authtoken")
        authentication._memo_written.clear()

    def url(self, tail: str = "") -> str:
        return f"/api/v1/projects/{self.project_id}/{tail}"


@pytest.fixture
def team(make_user: Callable[..., Any], client_for: Callable[[Any], APIClient]) -> Iterator[Team]:
    """(Cache entries, token memos and rate counters of this process emptied before and after.)"""
    api_state = ("apicache", "authtoken", "throttle")
    forget(*api_state)
    users = {
        "admin": make_user("alice"),
        "member": make_user("carol"),
        "reader": make_user("dave"),
        "second_reader": make_user("frank"),
        "outsider": make_user("bob"),
        "staff": make_user("operator", staff=True),
    }
    clients = {role: client_for(user) for role, user in users.items()}
    clients["anonymous"] = APIClient()
    created = clients["admin"].post("/api/v1/projects/", {"name": "team"}, format="json")
    assert created.status_code == 201, created.content
    project_id = created.json()["id"]
    for role, as_role in (("member", "member"), ("reader", "reader"), ("second_reader", "reader")):
        added = clients["admin"].post(
            f"/api/v1/projects/{project_id}/members/",
            {"user": users[role].username, "role": as_role},
            format="json",
        )
        assert added.status_code == 201, added.content
    other = clients["outsider"].post("/api/v1/projects/", {"name": "other"}, format="json")
    assert other.status_code == 201, other.content
    yield Team(project_id, other.json()["id"], users, clients)
    forget(*api_state)
