"""apps/vms/reads.py: the fixed-SQL list page and detail answer what the ORM path answers, byte for byte.

The reference is the path it replaced: ``selectors.vm_list`` filtered as the view filtered it,
paginated by ``CreatedCursorPagination`` and rendered by ``vm_row_data`` (rows of the ORM paths of
``apps/vms/representation.py``). Pages are walked forward
through ``next`` and back through ``previous`` (ties on ``created_at`` included, which put offsets
in the cursors), for an owner and for staff, with and without ``state``.
"""

from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
from django.test import RequestFactory
from rest_framework.request import Request

from apps.core.pagination import CreatedCursorPagination
from apps.core.renderers import dumps
from apps.vms import reads
from apps.vms.models import VM
from apps.vms.selectors import vm_list, vm_row_data, vm_rows
from tests.conftest import viewer_of

pytestmark = pytest.mark.django_db


def _orm_page(path: str, user: Any) -> bytes:
    request = Request(RequestFactory().get(path))
    state = request.query_params.get("state")
    queryset = vm_list(viewer=viewer_of(user), include_deleted="state" in request.query_params)
    if state:
        queryset = queryset.filter(state=state)
    pagination = CreatedCursorPagination()
    page = pagination.paginate_queryset(vm_rows(queryset), request)
    assert page is not None
    return dumps(pagination.get_paginated_response([vm_row_data(row) for row in page]).data)


def _lean_page(path: str, user: Any) -> bytes | None:
    return reads.vm_page(RequestFactory().get(path), viewer=viewer_of(user))


def _path(link: str) -> str:
    parts = urlsplit(link)
    return f"{parts.path}?{parts.query}"


@pytest.fixture
def fleet(user: Any, other_user: Any, node: Any, image: Any) -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    for index in range(14):
        owner = user if index % 4 else other_user
        state = ("running", "deleted", "running", "stopped", "running")[index % 5]
        vm = VM.objects.create(
            owner=owner,
            name=f"vm-{index}",
            image=image,
            node=None if index == 5 else node,
            state=state,
            vcpus=1,
            memory_mb=64,
            disk_gb=1,
        )
        # Pairs and a triple of equal timestamps (the cursor needs an offset there); whole seconds
        # and microseconds both.
        moment = start + timedelta(seconds=index // 2, microseconds=0 if index < 6 else 250_000)
        VM.objects.filter(pk=vm.pk).update(created_at=moment, updated_at=moment)
    VM.objects.filter(name__in=["vm-8", "vm-9", "vm-10"]).update(created_at=start + timedelta(seconds=9))


@pytest.mark.parametrize("query", ["page_size=3", "page_size=2&state=running", "page_size=1&state=deleted"])
@pytest.mark.parametrize("viewer", ["user", "staff"])
def test_pages_forward_and_back_are_the_orm_paths_bytes(fleet, user, staff, query, viewer):
    who = user if viewer == "user" else staff
    path = f"/api/v1/vms/?{query}&bust=1"
    seen: list[str] = []
    while True:
        lean = _lean_page(path, who)
        assert lean == _orm_page(path, who), path
        page = orjson.loads(lean)
        seen += [row["id"] for row in page["results"]]
        if page["next"] is None:
            break
        path = _path(page["next"])
    assert len(seen) == len(set(seen)) > 2
    back: list[str] = []
    while True:
        lean = _lean_page(path, who)
        assert lean == _orm_page(path, who), path
        page = orjson.loads(lean)
        back = [row["id"] for row in page["results"]] + back
        if page["previous"] is None:
            break
        path = _path(page["previous"])
    # Turning round at a tie skips rows (DRF's cursors do that); both paths skip the same ones.
    assert set(back) <= set(seen) and back[0] == seen[0]


def test_queries_it_does_not_cover_are_left_to_the_orm_path(fleet, user):
    for query in (
        "node=node1",
        "name=vm-1",
        "state=bogus",
        "state=",
        "format=json",
        "cursor=bz14",
        "cursor=cD14",
    ):
        assert _lean_page(f"/api/v1/vms/?{query}", user) is None, query


def test_detail_is_the_owners_or_staffs_and_includes_deleted_vms(fleet, user, other_user, staff):
    deleted = VM.objects.filter(owner=user, state="deleted").first()
    others = VM.objects.filter(owner=other_user).first()
    assert deleted is not None and others is not None
    for vm, who, visible in ((deleted, user, True), (others, user, False), (others, staff, True)):
        body = reads.vm_detail(vm_id=str(vm.pk), viewer=viewer_of(who))
        expected = dumps(vm_row_data(vm_rows(VM.objects.filter(pk=vm.pk)).get())) if visible else None
        assert body == expected
