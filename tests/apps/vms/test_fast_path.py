"""The VM read fast path (apps/vms/middleware.py): same answers as DRF, never someone else's, never stale auth.

Against the real Redis and PostgreSQL. A read by a token without a memo goes through DRF (it
authenticates, remembers the token and caches the body); once the token is remembered the middleware
answers hits from the cache and misses from the database (apps/vms/reads.py), and stores them.
"""

import tracemalloc
from typing import Any

import orjson
import pytest
import redis
from django.conf import settings
from django.core.cache import cache
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework import permissions, throttling
from rest_framework.test import APIClient

from apps.accounts.models import ApiToken
from apps.core import authentication
from apps.core.authentication import token_memo_key
from apps.projects.services import personal_project
from apps.vms import cache as vm_cache
from apps.vms.cache import api_cache_requests
from apps.vms.views import VMViewSet
from tests.apps.vms.conftest import COMPARED_HEADERS, forget
from tests.conftest import vm_payload

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _empty_api_state(forget_api_state: Any) -> None:
    """Every test starts without cache entries, token memos and rate counters."""


def _hits(view: str) -> float:
    return api_cache_requests.labels(view=view, result="hit")._value.get()


def _get(client: Any, path: str, **headers: Any) -> tuple[Any, int]:
    with CaptureQueriesContext(connection) as captured:
        response = client.get(path, **headers)
    return response, len(captured)


def _create(client: Any, name: str) -> dict[str, Any]:
    response = client.post("/api/v1/vms/", vm_payload(name=name), format="json")
    assert response.status_code == 202, response.content
    return response.json()


def _forget_token(client: Any) -> None:
    """Drop the memo of the client's token as if it had expired: its next read goes through DRF,
    which writes it again (this process forgets it wrote it; ``forget_tokens`` would leave a
    tombstone that refuses the new memo for a while)."""
    redis.Redis.from_url(settings.REDIS_URL).delete(token_memo_key(client.token_secret))
    authentication._memo_written.clear()


def _forget_entries() -> None:
    forget("apicache")


def _same_answer(slow: Any, fast: Any) -> None:
    assert slow.status_code == fast.status_code
    assert slow.content == fast.content
    for header in COMPARED_HEADERS:
        assert slow.headers.get(header) == fast.headers.get(header), header


@pytest.mark.parametrize("query", ["", "?state=pending", "?state=pending&page_hint=2"])
def test_a_list_hit_is_answered_without_a_query_and_as_drf_answers(api, user, node, image, query):
    _create(api, "web-1")
    _create(api, "web-2")
    _forget_token(api)
    hits = _hits("vm_list")
    slow, slow_queries = _get(api, f"/api/v1/vms/{query}")
    fast, fast_queries = _get(api, f"/api/v1/vms/{query}")
    assert slow.status_code == 200, slow.content
    assert slow_queries >= 2 and fast_queries == 0
    assert _hits("vm_list") - hits == 1
    _same_answer(slow, fast)


@pytest.mark.parametrize("query", ["", "?state=pending", "?page_size=1&bust=x"])
def test_a_list_miss_of_a_known_token_is_read_with_one_query_and_as_drf_answers(
    api, user, node, image, query
):
    for index in range(3):
        _create(api, f"web-{index}")
    _forget_token(api)
    slow, _ = _get(api, f"/api/v1/vms/{query}")  # DRF: authenticates, remembers the token, caches
    _forget_entries()
    misses = api_cache_requests.labels(view="vm_list", result="miss")._value.get()
    fast, fast_queries = _get(api, f"/api/v1/vms/{query}")
    assert fast_queries == 1  # the page; the caller is known from the token's memo
    assert api_cache_requests.labels(view="vm_list", result="miss")._value.get() - misses == 1
    _same_answer(slow, fast)
    hit, hit_queries = _get(api, f"/api/v1/vms/{query}")  # stored by the fast path
    assert hit_queries == 0
    _same_answer(slow, hit)
    if "page_size" in query:  # the next page's cursor, both ways
        following = fast.json()["next"].removeprefix("http://testserver")
        _forget_token(api)
        slow_next, _ = _get(api, following)
        _forget_entries()
        fast_next, queries = _get(api, following)
        assert queries == 1
        _same_answer(slow_next, fast_next)


def test_a_detail_miss_of_a_known_token_is_read_with_one_query_etag_and_304(api, node, image):
    vm = _create(api, "web-1")
    path = f"/api/v1/vms/{vm['id']}/"
    slow, _ = _get(api, path)
    _forget_entries()
    fast, queries = _get(api, path)
    assert queries == 1
    _same_answer(slow, fast)
    _forget_entries()
    not_modified, queries = _get(api, path, HTTP_IF_NONE_MATCH=fast.headers["ETag"])
    assert (not_modified.status_code, not_modified.content, queries) == (304, b"", 1)


def test_filters_only_the_orm_knows_go_to_drf_even_for_a_known_token(api, node, image):
    _create(api, "web-1")
    response, queries = _get(api, "/api/v1/vms/?node=node1")
    assert response.status_code == 200 and queries == 2  # the token and the page, through DRF
    assert [row["name"] for row in response.json()["results"]] == ["web-1"]
    bad, _ = _get(api, "/api/v1/vms/?state=bogus")
    assert bad.status_code == 400


def test_a_miss_answered_here_or_by_drf_is_counted_once_in_the_rate_window(
    api, other_api, node, image, settings
):
    theirs = _create(other_api, "bob-vm")
    settings.REST_FRAMEWORK = {
        **settings.REST_FRAMEWORK,
        "DEFAULT_THROTTLE_RATES": {**settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"], "user": "4/hour"},
    }
    statuses = [
        api.get("/api/v1/vms/?bust=1").status_code,  # DRF (no memo yet): counted, token remembered
        api.get("/api/v1/vms/?bust=2").status_code,  # a miss read here
        api.get(f"/api/v1/vms/{theirs['id']}/").status_code,  # not theirs: DRF answers 404, not counted again
        api.get("/api/v1/vms/?bust=3").status_code,
        api.get("/api/v1/vms/?bust=4").status_code,
    ]
    assert statuses == [200, 200, 404, 200, 429]


def test_a_detail_hit_is_answered_as_drf_answers_with_its_etag_and_304(api, user, node, image):
    vm = _create(api, "web-1")
    _forget_token(api)
    path = f"/api/v1/vms/{vm['id']}/"
    slow, _ = _get(api, path)
    fast, fast_queries = _get(api, path)
    assert fast_queries == 0
    _same_answer(slow, fast)
    not_modified, queries = _get(api, path, HTTP_IF_NONE_MATCH=fast.headers["ETag"])
    assert (not_modified.status_code, not_modified.content, queries) == (304, b"", 0)
    assert not_modified.headers["ETag"] == fast.headers["ETag"]
    # The same id spelled in capitals is the same VM and the same entry.
    upper, queries = _get(api, path.upper().replace("/API/V1/VMS/", "/api/v1/vms/"))
    assert (upper.status_code, upper.content, queries) == (200, fast.content, 0)


def test_hits_are_per_viewer_a_user_never_reads_anothers_entry(api, other_api, staff_api, node, image):
    mine = _create(api, "alice-vm")
    _create(other_api, "bob-vm")
    for client in (api, other_api, staff_api):  # fill every viewer's entries
        client.get("/api/v1/vms/")
        client.get(f"/api/v1/vms/{mine['id']}/")
    for _ in range(2):
        assert [row["name"] for row in api.get("/api/v1/vms/").json()["results"]] == ["alice-vm"]
        assert [row["name"] for row in other_api.get("/api/v1/vms/").json()["results"]] == ["bob-vm"]
        assert {row["name"] for row in staff_api.get("/api/v1/vms/").json()["results"]} == {
            "alice-vm",
            "bob-vm",
        }
        assert other_api.get(f"/api/v1/vms/{mine['id']}/").status_code == 404
        assert api.get(f"/api/v1/vms/{mine['id']}/").json()["name"] == "alice-vm"


def test_a_deleted_token_is_refused_on_the_next_request(api, user, node, image):
    _create(api, "web-1")
    api.get("/api/v1/vms/")
    assert api.get("/api/v1/vms/").status_code == 200  # a hit
    ApiToken.objects.filter(user=user).delete()
    response = api.get("/api/v1/vms/")
    assert response.status_code == 401, response.content


def test_a_deactivated_user_is_refused_on_the_next_request(api, user, node, image):
    _create(api, "web-1")
    api.get("/api/v1/vms/")
    assert api.get("/api/v1/vms/").status_code == 200
    user.is_active = False
    user.save()
    assert api.get("/api/v1/vms/").status_code == 401


def test_redis_holds_a_digest_of_the_token_never_the_token(api, user, node, image):
    api.get("/api/v1/vms/")
    key = api.token_secret
    client = redis.Redis.from_url(settings.REDIS_URL)
    project = str(personal_project(user).pk).encode()
    assert client.hgetall(token_memo_key(key)) == {
        b"user_id": str(user.pk).encode(),
        b"is_staff": b"0",
        b"project": project,
        b"role:" + project: b"admin",
    }
    assert key not in token_memo_key(key)
    assert not list(client.scan_iter(f"*{key}*"))


def test_an_unknown_or_malformed_token_is_left_to_drf(api, node, image):
    api.get("/api/v1/vms/")
    for header in ("Token nope", "Token ", "Token a b", "Bearer x", "Basic Zm9vOmJhcg=="):
        response = APIClient().get("/api/v1/vms/", HTTP_AUTHORIZATION=header)
        assert response.status_code == 401, (header, response.content)
        assert response.json()["error"]["code"] in {"not_authenticated", "authentication_failed"}


def test_browsable_indented_and_format_requests_are_left_to_drf(api, node, image):
    _create(api, "web-1")
    api.get("/api/v1/vms/")
    html = api.get("/api/v1/vms/", HTTP_ACCEPT="text/html")
    assert html.status_code == 200 and html["Content-Type"].startswith("text/html")
    indented = api.get("/api/v1/vms/", HTTP_ACCEPT="application/json; indent=2")
    assert b"\n  " in indented.content
    browsable = api.get("/api/v1/vms/?format=api")
    assert browsable["Content-Type"].startswith("text/html")


def test_hits_count_against_the_rate_limit(api, node, image, settings):
    settings.REST_FRAMEWORK = {
        **settings.REST_FRAMEWORK,
        "DEFAULT_THROTTLE_RATES": {**settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"], "user": "4/hour"},
    }
    statuses = [api.get("/api/v1/vms/").status_code for _ in range(6)]
    assert statuses == [200, 200, 200, 200, 429, 429]  # one miss through DRF, three hits, then refused
    assert "Retry-After" in api.get("/api/v1/vms/").headers


def test_writes_show_at_once_through_the_fast_path(api, node, image):
    vm = _create(api, "web-1")
    path = f"/api/v1/vms/{vm['id']}/"
    api.get(path)
    api.get("/api/v1/vms/")
    assert api.patch(path, {"name": "renamed"}, format="json").status_code == 200
    assert api.get(path).json()["name"] == "renamed"
    assert api.get("/api/v1/vms/").json()["results"][0]["name"] == "renamed"


def test_a_hit_is_in_the_api_log_with_its_user_and_route(api, user, node, image):
    from apps.monitoring.keys import API_LOG_LIST, key

    vm = _create(api, "web-1")
    api.get(f"/api/v1/vms/{vm['id']}/")
    client = redis.Redis.from_url(settings.REDIS_URL)
    client.delete(key(API_LOG_LIST))
    assert _get(api, f"/api/v1/vms/{vm['id']}/")[1] == 0  # a fast-path hit
    entries = [orjson.loads(raw) for raw in client.lrange(key(API_LOG_LIST), 0, -1)]
    assert [(entry["user"], entry["endpoint"], entry["status"]) for entry in entries] == [
        (user.pk, "/api/v1/vms/{pk}/", 200)
    ]


def test_a_redis_without_the_script_or_a_lost_connection_costs_one_slow_answer_at_most(api, node, image):
    """The fast path's own connection (one per thread): the script is loaded again when Redis lost it;
    a connection Redis closed fails one look-up (DRF answers it) and is made again for the next."""
    from apps.vms import cache as vm_cache

    _create(api, "web-1")
    first = api.get("/api/v1/vms/")  # through DRF (the token is not known yet): fills the cache
    hits = _hits("vm_list")
    assert api.get("/api/v1/vms/").content == first.content and _hits("vm_list") == hits + 1
    server = redis.Redis.from_url(settings.REDIS_URL)
    server.script_flush()
    assert api.get("/api/v1/vms/").content == first.content and _hits("vm_list") == hits + 2
    own = vm_cache._own.connection
    host, port = own._sock.getsockname()[:2]
    server.client_kill(f"{host}:{port}")
    assert api.get("/api/v1/vms/").content == first.content  # DRF's answer: its look-up has the pool
    assert _hits("vm_list") == hits + 3
    assert api.get("/api/v1/vms/").content == first.content and _hits("vm_list") == hits + 4
    assert vm_cache._own.connection._sock is not None


def _counted(user: Any) -> int:
    client = redis.Redis.from_url(settings.REDIS_URL)
    keys = list(client.scan_iter(f"{settings.CACHE_KEY_PREFIX}:throttle:user:{user.pk}:*"))
    return sum(int(client.get(found) or 0) for found in keys)


def test_a_permission_added_to_the_view_applies_to_the_fast_path(
    api, user, staff_api, node, image, monkeypatch
):
    vm = _create(api, "web-1")
    for client in (api, staff_api):  # memos and entries: the next reads would be fast-path hits
        client.get("/api/v1/vms/")
        client.get(f"/api/v1/vms/{vm['id']}/")
    monkeypatch.setattr(
        VMViewSet, "permission_classes", [permissions.IsAuthenticated, permissions.IsAdminUser]
    )
    counted = _counted(user)
    for path in ("/api/v1/vms/", f"/api/v1/vms/{vm['id']}/", "/api/v1/vms/?bust=miss"):
        refused, _ = _get(api, path)
        assert refused.status_code == 403, (path, refused.content)
        allowed, queries = _get(staff_api, path)
        assert allowed.status_code == 200
        assert queries == (1 if "miss" in path else 0)  # answered by the fast path
    assert _counted(user) == counted  # a refused request is not counted, as DRF counts it


def test_a_throttle_the_fast_path_cannot_count_sends_reads_to_drf(api, user, node, image, monkeypatch):
    _create(api, "web-1")
    api.get("/api/v1/vms/")
    assert _get(api, "/api/v1/vms/")[1] == 0  # a fast-path hit

    class TwoAnHour(throttling.UserRateThrottle):  # DRF's: a list of times in the Django cache
        scope = "two_an_hour"
        rate = "2/hour"

    cache.delete(f"throttle_two_an_hour_{user.pk}")
    monkeypatch.setattr(VMViewSet, "throttle_classes", [*VMViewSet.throttle_classes, TwoAnHour])
    statuses = []
    for _ in range(3):
        response, queries = _get(api, "/api/v1/vms/")
        statuses.append(response.status_code)
        assert queries >= 1  # DRF authenticated the token: not the fast path
    assert statuses == [200, 200, 429]
    cache.delete(f"throttle_two_an_hour_{user.pk}")


class NotNamedSecret(permissions.BasePermission):
    """A per-object rule: nobody reads a VM named ``secret``."""

    def has_object_permission(self, request: Any, view: Any, obj: Any) -> bool:
        return obj.name != "secret"


def test_an_object_permission_added_to_the_view_applies_to_details_of_every_path(
    api, user, node, image, monkeypatch
):
    secret, public = _create(api, "secret"), _create(api, "public")
    for vm in (secret, public):  # cached entries, a remembered token: fast-path hits
        api.get(f"/api/v1/vms/{vm['id']}/")
    monkeypatch.setattr(VMViewSet, "permission_classes", [*VMViewSet.permission_classes, NotNamedSecret])
    assert api.get(f"/api/v1/vms/{secret['id']}/").status_code == 403
    _forget_token(api)  # DRF answers
    assert api.get(f"/api/v1/vms/{secret['id']}/").status_code == 403
    allowed = api.get(f"/api/v1/vms/{public['id']}/")
    assert allowed.status_code == 200 and allowed.json()["name"] == "public"


def test_a_process_copy_of_a_body_is_served_only_while_redis_holds_the_same_bytes(api, user, node, image):
    """Redis flushed, its version counters back at the values they had, and another process storing
    a new body under a key this process already knows: the new body is answered, never this
    process's copy of the old one."""
    _create(api, "before-flush")
    first, _ = _get(api, "/api/v1/vms/")  # a miss: read, stored, copied into this process
    again, queries = _get(api, "/api/v1/vms/")
    assert queries == 0 and again.content == first.content
    client = redis.Redis.from_url(settings.REDIS_URL)
    prefix = f"{settings.CACHE_KEY_PREFIX}:apicache"
    versions: dict[Any, Any] = {key: client.get(key) for key in client.scan_iter(f"{prefix}:v:*")}
    (entry,) = client.scan_iter(f"{prefix}:vm_list:*")
    forget("apicache")  # the entries and the version counters
    client.mset(versions)  # the counters climbed back: the list's key is the first's again
    renamed = first.content.replace(b"before-flush", b"after-flush")
    client.set(entry, vm_cache.value_of(renamed)[1])  # as another process stores it
    hit, queries = _get(api, "/api/v1/vms/")
    assert queries == 0 and hit.content == renamed


def test_the_process_copies_keep_within_their_byte_budget_oldest_first() -> None:
    entry = 4 + 1 + vm_cache.BODY_ENTRY_OVERHEAD  # a 4-byte body under a 1-character key
    bodies = vm_cache._Bodies(budget=2 * entry + 1)
    bodies.put("a", b"d-a", b"aaaa", 60)
    bodies.put("b", b"d-b", b"bbbb", 60)
    assert bodies.get("a", b"d-a") == b"aaaa"  # now the most recently used
    bodies.put("c", b"d-c", b"cccc", 60)  # three entries: "b", the least recently used, goes
    assert bodies.get("b", b"d-b") is None
    assert bodies.get("a", b"d-a") == b"aaaa" and bodies.get("c", b"d-c") == b"cccc"
    assert bodies.get("a", b"other digest") is None
    bodies.put("huge", b"d", b"x" * 2 * entry, 60)  # larger than the budget: never kept
    assert bodies.get("huge", b"d") is None and bodies.used == 2 * entry


def test_a_process_copy_goes_once_its_entrys_ttl_has_passed_though_the_budget_has_room() -> None:
    """Every write makes new versions and old entries are never read again: copies kept until the
    budget pushed them out made the soak's web process grow by the whole budget for an hour."""
    now = [1000.0]
    bodies = vm_cache._Bodies(budget=1 << 30, clock=lambda: now[0])
    bodies.put("list-v1", b"d1", b"old list", vm_cache.LIST_TTL)
    bodies.put("detail-v1", b"d2", b"old detail", vm_cache.DETAIL_TTL)
    now[0] += vm_cache.LIST_TTL
    assert bodies.get("list-v1", b"d1") is None  # expired: never answered from the copy
    assert bodies.get("detail-v1", b"d2") == b"old detail"  # read: now the most recently used
    bodies.put("list-v2", b"d3", b"new list", vm_cache.LIST_TTL)
    assert "list-v1" not in bodies.found  # dropped, not only hidden
    now[0] += vm_cache.DETAIL_TTL
    bodies.put("list-v3", b"d4", b"newer list", vm_cache.LIST_TTL)
    assert list(bodies.found) == ["list-v3"]
    assert bodies.used == len(b"newer list") + len("list-v3") + vm_cache.BODY_ENTRY_OVERHEAD


def test_the_process_copies_hold_no_more_memory_than_the_budget_counts() -> None:
    """orjson's bytes keep its 4 KiB write buffer: kept as they were, 1000 small bodies took 4 MiB
    while the budget counted 40 KiB (the soak's web process grew by megabytes a minute)."""
    bodies = vm_cache._Bodies(budget=1 << 30)
    made = [orjson.dumps({"vms": index, "vcpus": 2, "memory_mb": 1024}) for index in range(1000)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for index, body in enumerate(made):
            bodies.put(f"k{index}", b"d" * 16, body, 60)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held <= bodies.used
    assert bodies.get("k7", b"d" * 16) == made[7]
