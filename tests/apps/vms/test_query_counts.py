"""Queries per endpoint: a fixed, small number whatever the number of rows (no N+1).

Each read is counted cold (cache empty) and warm (served from the response cache: only the token
look-up is left). Writes on batches are counted at two sizes and must cost the same.
"""

from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import orjson
import pytest
import redis
from django.conf import settings
from django.db import connection
from django.test.utils import CaptureQueriesContext

from apps.networks.services import default_network
from apps.projects.services import personal_project
from tests.conftest import set_quota, vm_payload

pytestmark = pytest.mark.django_db

AUTH = 1  # the token (and its user) of the request
AUDIT = 1  # the audit event of a write (apps/audit: one INSERT)
# A create's NICs: the networks' look-up, their lock, their taken addresses, whether the VMs' nodes
# host those networks already, and the NICs' insert (which skips taken MACs). The answer and the node
# task read the NICs just written from memory.
NICS = 5
# The project's default network, made by its first create: its quota, the subnets taken, the VNI
# draw, its insert in a savepoint.
DEFAULT_NETWORK = 6


@pytest.fixture(autouse=True)
def _empty_api_cache() -> Iterator[None]:
    client = redis.Redis.from_url(settings.REDIS_URL)
    for found in client.scan_iter(f"{settings.CACHE_KEY_PREFIX}:apicache:*", count=1000):
        client.delete(found)
    yield


@pytest.fixture
def roomy(user: Any, make_node: Callable[..., Any], image: Any) -> Any:
    set_quota(user, max_vms=10_000, max_vcpus=10_000, max_memory_mb=10_000_000)
    return make_node("big", vcpus=10_000, memory_mb=10_000_000, disk_gb=1_000_000)


def _items(prefix: str, count: int) -> list[dict[str, Any]]:
    return [vm_payload(name=f"{prefix}{i}", vcpus=1, memory_mb=64, disk_gb=1) for i in range(count)]


def _count(call: Callable[[], Any]) -> tuple[Any, int]:
    with CaptureQueriesContext(connection) as captured:
        response = call()
    assert response.status_code < 300, response.content[:300]
    return response, len(captured)


def test_vm_list_detail_and_me(api, staff_api, roomy, django_assert_max_num_queries):
    vms = api.post("/api/v1/vms/batch/", {"vms": _items("vm", 60)}, format="json").json()["vms"]
    detail = f"/api/v1/vms/{vms[0]['id']}/"
    for client in (api, staff_api):
        with django_assert_max_num_queries(AUTH + 1):
            assert len(client.get("/api/v1/vms/").json()["results"]) == 50
        with django_assert_max_num_queries(AUTH):
            client.get("/api/v1/vms/")
        with django_assert_max_num_queries(AUTH + 1):
            client.get("/api/v1/vms/?state=pending&node=big&page_size=500")
        with django_assert_max_num_queries(AUTH + 1):
            client.get(detail)
        with django_assert_max_num_queries(AUTH):
            client.get(detail)
    with django_assert_max_num_queries(AUTH + 3):  # usage, the project with its quota, the memberships
        api.get("/api/v1/users/me/")
    with django_assert_max_num_queries(AUTH + 2):  # the project, the memberships (usage cached)
        api.get("/api/v1/users/me/")


def test_browsable_list_is_no_n_plus_1_either(api, roomy, django_assert_max_num_queries):
    api.post("/api/v1/vms/batch/", {"vms": _items("vm", 30)}, format="json")
    with django_assert_max_num_queries(AUTH + 2):  # the page and the filter form's node choices
        assert api.get("/api/v1/vms/", HTTP_ACCEPT="text/html").status_code == 200


def test_batch_writes_cost_the_same_at_10_and_at_100_items(api, roomy, user):
    default_network(personal_project(user))
    small, small_count = _count(
        lambda: api.post("/api/v1/vms/batch/", {"vms": _items("s", 10)}, format="json")
    )
    large, large_count = _count(
        lambda: api.post("/api/v1/vms/batch/", {"vms": _items("l", 100)}, format="json")
    )
    assert small_count == large_count <= 17 + NICS
    renames: Callable[[list[dict[str, Any]]], dict[str, Any]] = lambda vms: {  # noqa: E731
        "vms": [{"id": vm["id"], "name": f"r-{vm['name']}"} for vm in vms]
    }
    _, small_count = _count(
        lambda: api.put("/api/v1/vms/batch/", renames(small.json()["vms"]), format="json")
    )
    _, large_count = _count(
        lambda: api.put("/api/v1/vms/batch/", renames(large.json()["vms"]), format="json")
    )
    assert small_count == large_count <= 15 + 1  # the answer's NICs

    def delete(vms: list[dict[str, Any]]) -> Any:
        body = orjson.dumps({"ids": [vm["id"] for vm in vms]})
        return api.generic("DELETE", "/api/v1/vms/batch/", body, content_type="application/json")

    _, small_count = _count(lambda: delete(small.json()["vms"]))
    _, large_count = _count(lambda: delete(large.json()["vms"]))
    assert small_count == large_count <= 15 + 1  # the answer's NICs


def test_single_vm_writes(api, roomy, django_assert_max_num_queries):
    with django_assert_max_num_queries(11 + NICS + DEFAULT_NETWORK):
        vm = api.post("/api/v1/vms/", vm_payload(), format="json").json()
    with django_assert_max_num_queries(11 + NICS):
        api.post("/api/v1/vms/", vm_payload(name="web-2"), format="json")
    # The rename is one statement (in the test's transaction, inside a savepoint: two more).
    with django_assert_max_num_queries(AUTH + 3 + AUDIT):
        api.patch(f"/api/v1/vms/{vm['id']}/", {"name": "renamed"}, format="json")
    # A resize goes through the locked read and the checks (and the answer's NICs).
    with django_assert_max_num_queries(12 + 1):
        api.patch(f"/api/v1/vms/{vm['id']}/", {"vcpus": 2}, format="json")
    with django_assert_max_num_queries(8 + 1):  # the answer's NICs
        api.delete(f"/api/v1/vms/{vm['id']}/")


def test_other_lists_do_not_grow_with_their_rows(api, staff_api, roomy):
    for index in range(3):
        api.post("/api/v1/vms/batch/", {"vms": _items(f"b{index}-", 20)}, format="json")
    batch_id = api.get("/api/v1/batches/").json()["results"][0]["id"]
    for path in ("/api/v1/batches/", f"/api/v1/batches/{batch_id}/", "/api/v1/migrations/"):
        _, count = _count(partial(api.get, path))
        assert count <= AUTH + 2, path
    for path in ("/api/v1/nodes/", "/api/v1/images/"):
        _, count = _count(partial(staff_api.get, path))
        assert count <= AUTH + 1, path
