"""Shared fixtures: users, tokens, API clients and fleet factories on the real PostgreSQL; a SQLite process."""

import gc
import itertools
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from rest_framework.test import APIClient

from apps.accounts.services import token_create
from apps.core.context import Viewer
from apps.projects.models import Project
from apps.projects.services import personal_project

# CI=true fails a run on a skip tests/skips_allowed.toml does not list.
pytest_plugins = ["tests.skip_gate"]


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Collect the suite's garbage before other plugins' end-of-session hooks import modules.

    A QMP event pump left pending by a test is finalized by the garbage collector; on CPython 3.11.7 a
    collection that runs such finalizers inside ``compile()`` (pytest rewriting a plugin module that
    schemathesis imports at session end) aborts the run with "AST constructor recursion depth
    mismatch" after every test passed.
    """
    gc.collect()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """The same collection before a failure's report: rendering it parses the test's source with
    ``compile()``, where a finalizer of a pending QMP pump aborted a CI run with the same error and
    hid which test had failed."""
    if call.excinfo is not None:
        gc.collect()
    yield


_sequence = itertools.count(1)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def run_on_sqlite(tmp_path: Path) -> Callable[[str], str]:
    """Run a script in its own process on a fresh SQLite file (``make run``'s default database, which
    the test process's PostgreSQL settings cannot give); its standard output, after a zero exit."""

    def run(script: str) -> str:
        env = os.environ | {
            "DATABASE_URL": f"sqlite:///{tmp_path / 'novacron.sqlite3'}",
            "NOVACRON_VAR_DIR": str(tmp_path),
            "DJANGO_SETTINGS_MODULE": "novacron.settings.test",
            "ALLOWED_HOSTS": "testserver",
        }
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        result = subprocess.run(
            [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    return run


@pytest.fixture
def make_user(db: None) -> Callable[..., Any]:
    def make(username: str | None = None, *, staff: bool = False, password: str = "pw-correct-horse") -> Any:
        name = username or f"user{next(_sequence)}"
        return get_user_model().objects.create_user(
            username=name, password=password, is_staff=staff, is_superuser=staff
        )

    return make


@pytest.fixture
def user(make_user: Callable[..., Any]) -> Any:
    return make_user("alice")


@pytest.fixture
def other_user(make_user: Callable[..., Any]) -> Any:
    return make_user("bob")


@pytest.fixture
def staff(make_user: Callable[..., Any]) -> Any:
    return make_user("operator", staff=True)


class TokenClient(APIClient):
    """An API client sending a token of its own, whose secret it keeps (``token_secret``)."""

    def __init__(self, token_secret: str) -> None:
        super().__init__()
        self.token_secret = token_secret
        self.credentials(HTTP_AUTHORIZATION=f"Token {token_secret}")


def _client_for(user: Any) -> TokenClient:
    return TokenClient(token_create(user=user).secret)


@pytest.fixture
def api(user: Any) -> APIClient:
    return _client_for(user)


@pytest.fixture
def other_api(other_user: Any) -> APIClient:
    return _client_for(other_user)


@pytest.fixture
def staff_api(staff: Any) -> APIClient:
    return _client_for(staff)


@pytest.fixture
def client_for() -> Callable[[Any], APIClient]:
    return _client_for


@pytest.fixture
def make_node(db: None) -> Callable[..., Any]:
    from apps.vms.models import Node

    def make(name: str | None = None, **fields: Any) -> Node:
        values = {
            "address": "127.0.0.1",
            "dwcp_address": "127.0.0.1:7000",
            "vcpus": 16,
            "memory_mb": 32768,
            "disk_gb": 500,
        } | fields
        return Node.objects.create(name=name or f"node{next(_sequence)}", **values)

    return make


@pytest.fixture
def make_image(db: None) -> Callable[..., Any]:
    from apps.vms.models import Image

    def make(name: str = "debian-12", **fields: Any) -> Image:
        values = {
            "kind": "disk",
            "format": "qcow2",
            "path": "/var/lib/novacron/images/debian-12.qcow2",
        } | fields
        return Image.objects.create(name=name, **values)

    return make


@pytest.fixture
def team(make_user: Callable[..., Any]) -> Callable[..., tuple[Project, dict[str, APIClient]]]:
    """``team(writer="member", reader="reader")``: a project "team" whose new users of those names
    have those roles, and an API client for each that acts in it (``X-Project``)."""
    from apps.projects.models import Membership

    def make(**roles: str) -> tuple[Project, dict[str, APIClient]]:
        project = Project.objects.create(name="team", **Project.default_quota())
        clients: dict[str, APIClient] = {}
        for name, role in roles.items():
            member = make_user(name)
            Membership.objects.create(project=project, user=member, role=role)
            clients[name] = _client_for(member)
            clients[name].defaults["HTTP_X_PROJECT"] = str(project.pk)
        return project, clients

    return make


@pytest.fixture
def make_migration(make_node: Callable[..., Any], make_image: Callable[..., Any]) -> Callable[..., Any]:
    """A factory of migrations of a new VM of ``owner`` (in their personal project), on two nodes."""
    from apps.migrations.models import Migration
    from apps.vms.models import VM

    nodes: list[Any] = []

    def make(owner: Any, *, status: str = "transferring", name: str = "moving") -> Migration:
        if not nodes:
            nodes.extend([make_node("migrating-from"), make_node("migrating-to")])
            nodes.append(make_image("migrating-image"))
        source, dest, image = nodes
        vm = VM.objects.create(
            owner=owner,
            name=name,
            image=image,
            node=source,
            state="running",
            vcpus=1,
            memory_mb=256,
            disk_gb=1,
        )
        return Migration.objects.create(
            vm=vm, source_node=source, dest_node=dest, status=status, phase="memory"
        )

    return make


@pytest.fixture
def node(make_node: Callable[..., Any]) -> Any:
    return make_node("node1")


@pytest.fixture
def image(make_image: Callable[..., Any]) -> Any:
    return make_image()


def viewer_of(user: Any) -> Viewer:
    """``user`` as the read paths see a request naming no project: staff the fleet, others their
    personal project."""
    project_id = None if user.is_staff else personal_project(user).pk
    return Viewer(user_id=user.pk, is_staff=bool(user.is_staff), project_id=project_id)


def set_quota(user: Any, **limits: int) -> None:
    """Set limits of ``user``'s personal project (made on first use), where their VMs go by default."""
    Project.objects.filter(pk=personal_project(user).pk).update(**limits)


def vm_payload(name: str = "web-1", image: Any = "debian-12", **extra: Any) -> dict[str, Any]:
    return {"name": name, "image": image, "vcpus": 2, "memory_mb": 1024, "disk_gb": 10} | extra
