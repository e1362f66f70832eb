"""Tenant isolation: another user's VMs, batches and migrations are invisible through every endpoint.

The matrix is built from the OpenAPI schema, so a new endpoint must be classified here (owned by a
user, or staff-only) before this test passes. Owned objects answer 404 to anyone else, whatever the
method; lists, filters, ETags and the per-viewer response cache never show or confirm them; staff-only
endpoints answer 403 to a normal user.
"""

import re
from typing import Any

import pytest
from drf_spectacular.generators import SchemaGenerator

from apps.accounts.services import token_create
from apps.migrations.models import Migration
from apps.networks.models import Network
from apps.networks.services import network_create
from apps.vms.models import VM, BatchItem, BatchOperation

pytestmark = pytest.mark.django_db

# Path templates whose {id} names an object owned by one user -> which object of the victim to use.
OWNED = {
    "/api/v1/vms/{id}/": "vm",
    "/api/v1/vms/{id}/console/": "vm",
    "/api/v1/vms/{id}/migrate/": "vm",
    "/api/v1/vms/{id}/reboot/": "vm",
    "/api/v1/vms/{id}/start/": "vm",
    "/api/v1/vms/{id}/stop/": "vm",
    "/api/v1/batches/{id}/": "batch",
    "/api/v1/migrations/{id}/": "migration",
    "/api/v1/migrations/{id}/cancel/": "migration",
    "/api/v1/migrations/{id}/events/": "migration",
    "/api/v1/migrations/{id}/force-complete/": "migration",
    "/api/v1/tokens/{id}/": "token",
    "/api/v1/networks/{id}/": "network",
}
# Fleet-wide or operator objects: readable by all (nodes, images) or staff only; writes staff only.
STAFF_ONLY = {
    "/api/v1/alert-rules/{id}/": "any",
    "/api/v1/alerts/{id}/": "any",
    "/api/v1/alerts/{id}/acknowledge/": "any",
    "/api/v1/nodes/{id}/": "write",
    "/api/v1/nodes/{id}/drain/": "any",
    "/api/v1/images/{id}/": "write",  # the operators' catalog (private images: tests/apps/images)
    "/api/v1/images/{id}/file/": "write",
    "/api/v1/users/{id}/": "any",
    "/api/v1/users/{id}/password/": "any",
}
STAFF_LISTS = {
    "/api/v1/alert-rules/": "any",
    "/api/v1/api-logs/": "any",
    "/api/v1/alerts/": "any",
    "/api/v1/users/": "any",
}
# Projects themselves, their members and quota: the project in the path, roles as
# tests/apps/projects/test_role_matrix.py checks them for every method (others: 404).
PROJECT_ADMINISTRATION = {
    "/api/v1/projects/{id}/": "project",
    "/api/v1/projects/{id}/members/": "project",
    "/api/v1/projects/{id}/members/{user_id}/": "membership",
    "/api/v1/projects/{id}/quota/": "project",
}
BODIES: dict[str, dict[str, Any]] = {
    "/api/v1/vms/{id}/": {"name": "hijacked"},
    "/api/v1/vms/{id}/migrate/": {"mode": "cold"},
    "/api/v1/migrations/{id}/": {"bandwidth_limit_mbps": 1},
    "/api/v1/networks/{id}/": {"name": "hijacked"},
}


@pytest.fixture
def victim_objects(user, make_node, make_image) -> dict[str, Any]:
    source, dest = make_node("iso-a"), make_node("iso-b")
    image = make_image("iso-image")
    vm = VM.objects.create(
        owner=user,
        name="secret-vm",
        image=image,
        node=source,
        vcpus=1,
        memory_mb=64,
        disk_gb=1,
        state="running",
    )
    batch = BatchOperation.objects.create(owner_id=user.pk, kind="create", total=1)
    BatchItem.objects.create(batch=batch, index=0, vm=vm, status="succeeded")
    migration = Migration.objects.create(
        vm=vm, source_node=source, dest_node=dest, mode="live", requested_by=user, vm_state_before="running"
    )
    token = token_create(user=user, name="victim").token
    network = network_create(project_id=vm.project_id, name="secret-net", cidr="10.77.0.0/24")
    return {
        "network": network,
        "vm": vm,
        "batch": batch,
        "migration": migration,
        "node": source,
        "image": image,
        "token": token,
        "user": user,
    }


def _schema_operations() -> list[tuple[str, str]]:
    schema = SchemaGenerator().get_schema(request=None, public=True)
    return [
        (path, method)
        for path, operations in schema["paths"].items()
        for method in operations
        if method in ("get", "post", "put", "patch", "delete")
    ]


def _call(client, method: str, path: str, body: dict[str, Any] | None = None):
    return getattr(client, method)(path, body or {}, format="json") if method != "get" else client.get(path)


def test_every_templated_endpoint_is_classified():
    templated = {path for path, _ in _schema_operations() if "{" in path}
    unclassified = templated - set(OWNED) - set(STAFF_ONLY) - set(PROJECT_ADMINISTRATION)
    assert not unclassified, f"classify these endpoints in the isolation matrix: {sorted(unclassified)}"


def test_another_users_objects_are_404_on_every_owned_endpoint(api, other_api, victim_objects):
    vm = victim_objects["vm"]
    # The owner reads first, so any per-viewer cache is warm with the owner's view.
    etag = api.get(f"/api/v1/vms/{vm.pk}/").get("ETag")
    checked = 0
    for path, method in _schema_operations():
        kind = OWNED.get(path)
        if kind is None:
            continue
        url = path.replace("{id}", str(victim_objects[kind].pk))
        response = _call(other_api, method, url, BODIES.get(path))
        assert response.status_code == 404, (method, url, response.status_code)
        checked += 1
    assert checked >= 13
    if etag:
        response = other_api.get(f"/api/v1/vms/{vm.pk}/", HTTP_IF_NONE_MATCH=etag)
        assert response.status_code == 404
    vm.refresh_from_db()
    assert vm.name == "secret-vm" and vm.state == "running" and not vm.pending_action
    assert Migration.objects.get(pk=victim_objects["migration"].pk).bandwidth_limit_mbps is None
    assert victim_objects["user"].api_tokens.filter(name="victim").exists()
    assert Network.objects.filter(pk=victim_objects["network"].pk, name="secret-net").exists()


def test_batch_endpoints_refuse_another_users_vms(other_api, victim_objects):
    vm = victim_objects["vm"]
    for method, body in (
        ("put", {"vms": [{"id": str(vm.pk), "name": "hijacked"}]}),
        ("delete", {"ids": [str(vm.pk)]}),
    ):
        response = _call(other_api, method, "/api/v1/vms/batch/", body)
        assert 400 <= response.status_code < 500 and response.status_code != 409, (method, response.json())
        assert "secret-vm" not in response.content.decode()
    vm.refresh_from_db()
    assert vm.name == "secret-vm" and vm.state == "running"


def test_lists_filters_and_cached_responses_never_leak(api, other_api, victim_objects):
    ids = {str(victim_objects[kind].pk) for kind in ("vm", "batch", "migration")}
    lists = [
        "/api/v1/networks/",
        "/api/v1/networks/?name=secret-net",
        "/api/v1/vms/",
        "/api/v1/vms/?name=secret-vm",
        "/api/v1/vms/?state=running",
        "/api/v1/vms/?state=deleted",
        f"/api/v1/vms/?node={victim_objects['node'].name}",
        "/api/v1/batches/",
        "/api/v1/migrations/",
        "/api/v1/users/me/",
        f"/api/v1/metrics/?name=vm.rss_bytes&vm={victim_objects['vm'].pk}",
    ]
    for url in lists:
        api.get(url)  # warm whatever the owner's view caches
        response = other_api.get(url)
        assert response.status_code in (200, 403, 404), (url, response.status_code)
        text = response.content.decode()
        leaked = [value for value in ids if value in text] + [
            name for name in ("secret-vm", "secret-net", "10.77.0.0") if name in text
        ]
        assert not leaked, (url, leaked)
    usage = other_api.get("/api/v1/users/me/").json()
    assert re.search(r'"vms":\s*0', str(usage).replace("'", '"')) or usage.get("usage", {}).get("vms") == 0


def test_staff_only_endpoints_refuse_a_normal_user(other_api, staff, victim_objects):
    from apps.monitoring.models import AlertRule

    rule = AlertRule.objects.first()
    objects = {"any": rule.pk if rule else 1}
    for path, method in _schema_operations():
        scope = STAFF_ONLY.get(path) or STAFF_LISTS.get(path)
        if scope is None or (scope == "write" and method == "get"):
            continue
        if "/nodes/" in path:
            url = path.replace("{id}", str(victim_objects["node"].pk))
        elif "/images/" in path:
            url = path.replace("{id}", str(victim_objects["image"].pk))
        elif "/users/" in path:
            url = path.replace("{id}", str(victim_objects["user"].pk))
        else:
            url = path.replace("{id}", str(objects["any"]))
        response = _call(other_api, method, url, {})
        assert response.status_code in (403, 404), (method, url, response.status_code)
    assert other_api.post("/api/v1/nodes/", {"name": "x"}, format="json").status_code == 403
    shared_image = {"name": "x", "format": "qcow2", "visibility": "shared"}  # users create private ones
    assert other_api.post("/api/v1/images/", shared_image, format="json").status_code == 403
    victim = victim_objects["user"]
    victim.refresh_from_db()
    assert victim.is_active and victim.check_password("pw-correct-horse")


def test_admin_and_dashboard_need_staff(client, other_user, staff):
    client.force_login(other_user)
    assert client.get("/admin/").status_code == 302  # to the admin login: not staff
    assert client.get("/dashboard/").status_code in (302, 403)
    client.force_login(staff)
    assert client.get("/admin/").status_code == 200
