"""The API response cache: per-viewer entries, invalidation by every write, ETags, Redis outages, gzip.

Runs against the real Redis (the test database, keys under this process's prefix). Every test starts
with this process's cache entries and version counters removed.
"""

import gzip
import logging
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework.renderers import JSONRenderer

from apps.core.renderers import ORJSONRenderer
from apps.migrations.choices import MigrationMode
from apps.migrations.services import migration_request
from apps.projects.services import personal_project
from apps.vms.cache import api_cache_requests
from apps.vms.models import VM
from apps.vms.serializers import VMSerializer
from apps.vms.services import vm_record_report
from apps.vms.services.reports import _node_down
from tests.apps.vms.conftest import forget
from tests.conftest import vm_payload

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _empty_api_cache() -> Iterator[None]:
    forget("apicache")
    yield
    forget("apicache")


def _count(view: str, result: str) -> float:
    return api_cache_requests.labels(view=view, result=result)._value.get()


def _queries(client: Any, path: str, **headers: Any) -> tuple[Any, int]:
    with CaptureQueriesContext(connection) as captured:
        response = client.get(path, **headers)
    return response, len(captured)


def _create(client: Any, name: str, **extra: Any) -> dict[str, Any]:
    response = client.post("/api/v1/vms/", vm_payload(name=name, **extra), format="json")
    assert response.status_code == 202, response.content
    return response.json()


def test_second_list_read_is_a_cache_hit_with_the_same_body_and_no_list_query(api, node, image):
    _create(api, "web-1")
    hits, misses = _count("vm_list", "hit"), _count("vm_list", "miss")
    first, first_queries = _queries(api, "/api/v1/vms/")
    second, second_queries = _queries(api, "/api/v1/vms/")
    assert first.status_code == second.status_code == 200
    assert first.content == second.content
    assert first_queries == 1  # the page (the token is remembered since the create: no auth query)
    assert second_queries == 0  # the fast path (apps/vms/middleware.py): no query at all
    assert (_count("vm_list", "hit") - hits, _count("vm_list", "miss") - misses) == (1, 1)


def test_list_rows_have_the_serializer_shape_byte_for_byte(api, staff_api, node, image, make_node):
    _create(api, "on-node")
    vm = _create(api, "no-node")
    VM.objects.filter(pk=vm["id"]).update(node=None, state_reason="line\u2028break é")
    expected = JSONRenderer().render(
        VMSerializer(
            VM.objects.select_related("node", "image", "owner").order_by("-created_at"), many=True
        ).data
    )
    for client in (api, staff_api):
        response = client.get("/api/v1/vms/")
        assert orjson.dumps(response.json()["results"]) == orjson.dumps(orjson.loads(expected))
        assert response.content.endswith(expected + b"}")


def test_orjson_renderer_writes_what_drf_json_renderer_writes(node, image, user):
    from django.utils import timezone

    data = {
        "vm": VMSerializer(
            VM(
                owner=user,
                project=personal_project(user),
                name="x",
                image=image,
                node=node,
                vcpus=1,
                memory_mb=64,
                disk_gb=1,
            )
        ).data,
        "now": timezone.now(),
        "nested": [{"k": "\u2029", 1: None}],
    }
    assert ORJSONRenderer().render(data) == JSONRenderer().render(data)


def test_users_never_read_each_others_cached_lists_or_details(api, other_api, staff_api, node, image):
    mine = _create(api, "alice-vm")
    theirs = _create(other_api, "bob-vm")
    for _ in range(2):  # the second round reads from the cache
        assert [vm["id"] for vm in api.get("/api/v1/vms/").json()["results"]] == [mine["id"]]
        assert [vm["id"] for vm in other_api.get("/api/v1/vms/").json()["results"]] == [theirs["id"]]
        staff_ids = {vm["id"] for vm in staff_api.get("/api/v1/vms/").json()["results"]}
        assert staff_ids == {mine["id"], theirs["id"]}
        assert api.get(f"/api/v1/vms/{theirs['id']}/").status_code == 404
        assert other_api.get(f"/api/v1/vms/{mine['id']}/").status_code == 404
        assert api.get(f"/api/v1/vms/{mine['id']}/").json()["owner"] == "alice"
        assert staff_api.get(f"/api/v1/vms/{mine['id']}/").json()["owner"] == "alice"
        assert api.get("/api/v1/users/me/").json()["username"] == "alice"
        assert other_api.get("/api/v1/users/me/").json()["usage"]["vms"] == 1


def test_a_user_losing_staff_rights_no_longer_reads_the_staff_entries(
    api, other_api, make_user, client_for, node, image
):
    _create(other_api, "bob-vm")
    operator = make_user("ops", staff=True)
    ops_api = client_for(operator)
    assert len(ops_api.get("/api/v1/vms/").json()["results"]) == 1
    assert len(ops_api.get("/api/v1/vms/").json()["results"]) == 1  # a fast-path hit
    # As the admin does it: a save, whose signal drops the token's memo that the fast path trusts.
    operator.is_staff = False
    operator.save()
    assert ops_api.get("/api/v1/vms/").json()["results"] == []


def test_every_write_through_the_api_shows_at_once(api, staff_api, node, image):
    vm = _create(api, "web-1")
    path = f"/api/v1/vms/{vm['id']}/"

    def views() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]:
        listed = api.get("/api/v1/vms/").json()["results"]
        staff_listed = staff_api.get("/api/v1/vms/").json()["results"]
        return (
            api.get(path).json(),
            listed[0] if listed else {},
            staff_listed[0],
            api.get("/api/v1/users/me/").json(),
        )

    views()  # fill the cache
    api.patch(path, {"name": "renamed"}, format="json")
    detail, listed, staff_listed, _me = views()
    assert detail["name"] == listed["name"] == staff_listed["name"] == "renamed"

    VM.objects.filter(pk=vm["id"]).update(state="running")  # what a node report does, below the API
    vm_record_report(vm_id=vm["id"], operation="create", ok=True, state="running", reason="", node="node1")
    assert api.get(path).json()["state"] == "running"
    api.post(f"{path}stop/")
    detail, listed, staff_listed, _me = views()
    assert detail["pending_action"] == listed["pending_action"] == staff_listed["pending_action"] == "stop"

    second = _create(api, "web-2")
    _detail, listed, staff_listed, me = views()
    assert listed["id"] == staff_listed["id"] == second["id"]
    assert me["usage"]["vms"] == 2

    api.delete(f"/api/v1/vms/{second['id']}/")
    assert api.get(f"/api/v1/vms/{second['id']}/").json()["state"] == "deleting"
    vm_record_report(
        vm_id=second["id"], operation="delete", ok=True, state="deleted", reason="", node="node1"
    )
    _detail, listed, _staff_listed, me = views()
    assert listed["id"] == vm["id"]
    assert me["usage"]["vms"] == 1


def test_batch_writes_show_at_once(api, node, image):
    created = api.post(
        "/api/v1/vms/batch/", {"vms": [vm_payload(name=f"b{i}") for i in range(3)]}, format="json"
    ).json()["vms"]
    ids = [vm["id"] for vm in created]
    assert len(api.get("/api/v1/vms/").json()["results"]) == 3
    assert api.get(f"/api/v1/vms/{ids[0]}/").json()["name"] == "b0"
    api.put("/api/v1/vms/batch/", {"vms": [{"id": ids[0], "name": "renamed"}]}, format="json")
    assert api.get(f"/api/v1/vms/{ids[0]}/").json()["name"] == "renamed"
    assert "renamed" in {vm["name"] for vm in api.get("/api/v1/vms/").json()["results"]}
    api.generic(
        "DELETE", "/api/v1/vms/batch/", orjson.dumps({"ids": ids[1:]}), content_type="application/json"
    )
    assert {vm["state"] for vm in api.get("/api/v1/vms/").json()["results"]} == {"pending", "deleting"}
    assert api.get(f"/api/v1/vms/{ids[1]}/").json()["state"] == "deleting"


def test_node_down_and_migration_show_at_once(api, user, node, make_node, image):
    vm = _create(api, "web-1")
    path = f"/api/v1/vms/{vm['id']}/"
    VM.objects.filter(pk=vm["id"]).update(state="running")
    vm_record_report(vm_id=vm["id"], operation="create", ok=True, state="running", reason="", node="node1")
    assert api.get(path).json()["state"] == "running"
    assert api.get("/api/v1/vms/").json()["results"][0]["state"] == "running"
    migration_request(
        vm=VM.objects.get(pk=vm["id"]),
        requested_by=user,
        mode=MigrationMode.COLD,
        dest_node=make_node("node2"),
    )
    assert api.get(path).json()["state"] == "migrating"
    assert api.get("/api/v1/vms/").json()["results"][0]["state"] == "migrating"
    VM.objects.filter(pk=vm["id"]).update(state="running")
    vm_record_report(vm_id=vm["id"], operation="create", ok=True, state="running", reason="", node="node1")
    from django.utils import timezone

    _node_down(node, timezone.now())
    assert api.get(path).json()["state"] == "error"
    assert api.get("/api/v1/vms/").json()["results"][0]["state"] == "error"


def test_renaming_a_node_or_image_shows_in_cached_vm_bodies(api, staff_api, node, image):
    vm = _create(api, "web-1")
    path = f"/api/v1/vms/{vm['id']}/"
    assert api.get(path).json()["node"] == "node1"
    assert api.get("/api/v1/vms/").json()["results"][0]["image"] == "debian-12"
    assert (
        staff_api.patch(f"/api/v1/nodes/{node.pk}/", {"name": "renamed-node"}, format="json").status_code
        == 200
    )
    assert (
        staff_api.patch(f"/api/v1/images/{image.pk}/", {"name": "renamed-image"}, format="json").status_code
        == 200
    )
    assert api.get(path).json()["node"] == "renamed-node"
    assert api.get("/api/v1/vms/").json()["results"][0]["image"] == "renamed-image"


def test_detail_has_an_etag_and_answers_304_until_the_vm_changes(api, node, image):
    vm = _create(api, "web-1")
    path = f"/api/v1/vms/{vm['id']}/"
    first = api.get(path)
    etag = first["ETag"]
    assert etag.startswith('"') and etag.endswith('"')
    again = api.get(path, HTTP_IF_NONE_MATCH=etag)
    assert again.status_code == 304
    assert again.content == b""
    assert again["ETag"] == etag
    assert api.get(path, HTTP_IF_NONE_MATCH=f'W/{etag}, "other"').status_code == 304
    api.patch(path, {"name": "renamed"}, format="json")
    changed = api.get(path, HTTP_IF_NONE_MATCH=etag)
    assert changed.status_code == 200
    assert changed.json()["name"] == "renamed"
    assert changed["ETag"] != etag


def test_browsable_and_indented_answers_bypass_the_cache_and_keep_working(api, node, image):
    vm = _create(api, "web-1")
    html = api.get("/api/v1/vms/", HTTP_ACCEPT="text/html")
    assert html.status_code == 200 and b"web-1" in html.content
    assert api.get(f"/api/v1/vms/{vm['id']}/", HTTP_ACCEPT="text/html").status_code == 200
    indented = api.get("/api/v1/vms/", HTTP_ACCEPT="application/json; indent=2")
    assert b'\n  "results"' in indented.content


def test_redis_down_reads_the_database_logs_and_never_fails(api, node, image, settings, caplog):
    vm = _create(api, "web-1")
    api.get("/api/v1/vms/")  # a cached entry that must not be needed
    closed = dict(settings.CACHES["default"], LOCATION="redis://127.0.0.1:1/0")
    settings.CACHES = {"default": closed}
    import apps.vms.cache as vm_cache

    vm_cache._last_warning = 0.0
    with caplog.at_level(logging.WARNING, logger="apps.vms.cache"):
        listed = api.get("/api/v1/vms/")
        detail = api.get(f"/api/v1/vms/{vm['id']}/")
        me = api.get("/api/v1/users/me/")
        renamed = api.patch(f"/api/v1/vms/{vm['id']}/", {"name": "renamed"}, format="json")
    assert (listed.status_code, detail.status_code, me.status_code, renamed.status_code) == (
        200,
        200,
        200,
        200,
    )
    assert listed.json()["results"][0]["id"] == vm["id"]
    assert api.get(f"/api/v1/vms/{vm['id']}/").json()["name"] == "renamed"
    assert me.json()["usage"]["vms"] == 1
    assert any("Redis did not answer" in record.message for record in caplog.records)
    assert any("invalidation" in record.message for record in caplog.records)


def test_large_bodies_are_gzipped_small_ones_not(api, node, image):
    for index in range(12):
        _create(api, f"vm-{index}", vcpus=1, memory_mb=128, disk_gb=1)
    listed = api.get("/api/v1/vms/", HTTP_ACCEPT_ENCODING="gzip")
    assert listed["Content-Encoding"] == "gzip"
    assert "Accept-Encoding" in listed["Vary"]
    assert len(orjson.loads(gzip.decompress(listed.content))["results"]) == 12
    small = api.get("/api/v1/users/me/", HTTP_ACCEPT_ENCODING="gzip")
    assert len(small.content) < 1024
    assert not small.has_header("Content-Encoding")
    plain = api.get("/api/v1/vms/")
    assert not plain.has_header("Content-Encoding")
