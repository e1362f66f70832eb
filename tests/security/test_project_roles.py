"""Projects and roles over every endpoint of the OpenAPI schema that acts on a project's resources.

A team project holds a VM, a batch and a migration. For every templated path of
``test_tenant_isolation.OWNED`` that names one of those and every method the schema gives it, each caller gets exactly what
their role allows: a reader reads (200) and is refused every change (403, nothing changed); a
member and an admin act (never 401, 403 or 404); a member of another project, naming that project
or their own, and a user naming a project they are not in, get 404 (the project's resources are not
confirmed to exist); an anonymous client gets 401. Reads are made twice, so the second is answered
by the VM read fast path where it answers (its token memo written by the first), and both answers
must agree. Lists never show another project's objects.
"""

from typing import Any

import pytest
from rest_framework.test import APIClient

from apps.migrations.models import Migration
from apps.networks.models import Network
from apps.networks.services import network_create
from apps.projects.models import Membership, Project, Role
from apps.vms.models import VM, BatchItem, BatchOperation
from tests.security.test_tenant_isolation import BODIES, OWNED, _call, _schema_operations

pytestmark = pytest.mark.django_db

PROJECT_KINDS = frozenset({"vm", "batch", "migration", "network"})  # OWNED's kinds that a project holds
ROLES = ("reader", "member", "admin", "outsider", "outsider-naming-it", "anonymous")
# Writes last, deletions at the very end: a member's delete must not hide the other endpoints' VM.
METHOD_ORDER = {"get": 0, "patch": 1, "put": 1, "post": 2, "delete": 3}


@pytest.fixture
def team(make_user: Any, make_node: Any, make_image: Any) -> dict[str, Any]:
    project = Project.objects.create(name="team", **Project.default_quota())
    source, dest = make_node("team-a"), make_node("team-b")
    creator = make_user("creator")
    Membership.objects.create(project=project, user=creator, role=Role.ADMIN)
    vm = VM.objects.create(
        owner=creator,
        project=project,
        name="team-vm",
        image=make_image("team-image"),
        node=source,
        vcpus=1,
        memory_mb=64,
        disk_gb=1,
        state="running",
    )
    batch = BatchOperation.objects.create(owner=creator, project=project, kind="create", total=1)
    BatchItem.objects.create(batch=batch, index=0, vm=vm, status="succeeded")
    migration = Migration.objects.create(
        vm=vm,
        source_node=source,
        dest_node=dest,
        mode="live",
        requested_by=creator,
        vm_state_before="running",
    )
    network = network_create(project_id=project.pk, name="team-net", cidr="10.78.0.0/24")
    return {"project": project, "vm": vm, "batch": batch, "migration": migration, "network": network}


def _caller(role: str, team: dict[str, Any], make_user: Any, client_for: Any) -> APIClient:
    """A client of ``role`` acting in the team project (outsiders: in their own or naming it)."""
    if role == "anonymous":
        return APIClient(HTTP_X_PROJECT=str(team["project"].pk))
    user = make_user(role)
    if role in ("reader", "member", "admin"):
        Membership.objects.create(project=team["project"], user=user, role=role)
        client = client_for(user)
        client.defaults["HTTP_X_PROJECT"] = str(team["project"].pk)  # on every request (RequestFactory's)
        return client
    elsewhere = Project.objects.create(name=f"{role}-own", **Project.default_quota())
    Membership.objects.create(project=elsewhere, user=user, role=Role.ADMIN)
    client = client_for(user)
    named = team["project"] if role == "outsider-naming-it" else elsewhere
    client.defaults["HTTP_X_PROJECT"] = str(named.pk)
    return client


def _expected(role: str, method: str, path: str = "") -> set[int] | None:
    """The statuses ``role`` may get; None: anything but 401, 403 and 404 (a member acts). The
    events URL of a readable migration redirects to the streams service (307)."""
    if role == "anonymous":
        return {401}
    if role.startswith("outsider"):
        return {404}
    if role == "reader":
        return ({307} if path.endswith("/events/") else {200}) if method == "get" else {403}
    return None


@pytest.mark.parametrize("role", ROLES)
def test_every_project_endpoint_answers_each_role_as_the_role_allows(role, team, make_user, client_for):
    client = _caller(role, team, make_user, client_for)
    operations = sorted(
        ((path, method) for path, method in _schema_operations() if OWNED.get(path) in PROJECT_KINDS),
        key=lambda operation: METHOD_ORDER[operation[1]],
    )
    checked = 0
    for path, method in operations:
        url = path.replace("{id}", str(team[OWNED[path]].pk))
        response = _call(client, method, url, BODIES.get(path))
        allowed = _expected(role, method, path)
        if allowed is None:
            assert response.status_code not in (401, 403, 404), (role, method, url, response.content)
        else:
            assert response.status_code in allowed, (
                role,
                method,
                url,
                response.status_code,
                response.content,
            )
        if method == "get" and not path.endswith("/events/"):  # (a stream is not read here)
            again = _call(client, method, url)  # the fast path's answer, where it answers
            assert (again.status_code, again.content) == (response.status_code, response.content), url
        checked += 1
    assert checked >= 13
    if role not in ("member", "admin"):
        vm = VM.objects.get(pk=team["vm"].pk)
        assert (vm.name, vm.state, vm.pending_action) == ("team-vm", "running", "")
        assert Migration.objects.get(pk=team["migration"].pk).bandwidth_limit_mbps is None
        assert Network.objects.get(pk=team["network"].pk).name == "team-net"


@pytest.mark.parametrize("role", ["outsider", "outsider-naming-it"])
def test_lists_never_show_another_projects_objects(role, team, make_user, client_for):
    member = _caller("member", team, make_user, client_for)
    client = _caller(role, team, make_user, client_for)
    ids = {str(team[kind].pk) for kind in ("vm", "batch", "migration")}
    for url in ("/api/v1/vms/", "/api/v1/vms/?state=running", "/api/v1/batches/", "/api/v1/migrations/"):
        assert (
            str(team["vm"].pk) in member.get(url).content.decode() or "batches" in url or "migrations" in url
        )
        for _ in range(2):  # the second through the fast path where it answers
            response = client.get(url)
            assert response.status_code in (200, 404), (url, response.status_code)
            assert not [value for value in ids if value in response.content.decode()], url


def test_a_member_and_an_admin_act_on_the_same_vms_and_a_reader_cannot(team, make_user, client_for):
    member = _caller("member", team, make_user, client_for)
    admin = _caller("admin", team, make_user, client_for)
    reader = _caller("reader", team, make_user, client_for)
    vm = team["vm"]
    assert member.patch(f"/api/v1/vms/{vm.pk}/", {"name": "renamed"}, format="json").status_code == 200
    assert admin.get(f"/api/v1/vms/{vm.pk}/").json()["name"] == "renamed"
    assert reader.get(f"/api/v1/vms/{vm.pk}/").json()["project"] == "team"
    refused = reader.patch(f"/api/v1/vms/{vm.pk}/", {"name": "reader-was-here"}, format="json")
    assert refused.status_code == 403 and "reader" in refused.json()["error"]["message"]
    assert VM.objects.get(pk=vm.pk).name == "renamed"


def test_moving_a_member_out_removes_their_access_at_once_fast_path_included(team, make_user, client_for):
    from apps.core.authentication import forget_user

    member = _caller("member", team, make_user, client_for)
    url = f"/api/v1/vms/{team['vm'].pk}/"
    assert member.get("/api/v1/vms/").status_code == 200
    assert member.get("/api/v1/vms/").status_code == 200  # now a fast-path hit
    assert member.get(url).status_code == 200
    gone = Membership.objects.get(project=team["project"], user__username="member")
    gone.delete()
    forget_user(gone.user_id)  # what the projects API's member removal does
    assert member.get("/api/v1/vms/").status_code == 404
    assert member.get(url).status_code == 404
