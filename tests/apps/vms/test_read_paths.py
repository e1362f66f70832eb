"""Every path of a VM read gives the same answer: a property over random viewers, the projects they
name (by id or name, in the header or the query; theirs, another's, none), filters, cursors, Accept
headers and conditional requests (hypothesis).

The paths, for one request: DRF alone (the fast path middleware left out) with a cold cache, then
its cached answer; the fast path (the caller's token remembered) missing, then hitting; and the
portable read (the ORM, as on SQLite) through DRF and through the fast path. Each answer must have
the reference's status, bytes and headers; a page's ``next`` link is followed and compared again. An
indented or browsable answer (the serializer's) must hold the same VMs as the compact one.
"""

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple
from urllib.parse import urlencode, urlsplit

import orjson
import pytest
from django.conf import settings
from django.test import override_settings
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from rest_framework.test import APIClient

from apps.accounts.services import token_create
from apps.core import db
from apps.projects.models import Membership, Project, Role
from apps.projects.services import personal_project
from apps.vms.models import VM
from tests.apps.vms.conftest import COMPARED_HEADERS, forget

pytestmark = pytest.mark.django_db

FAST_PATH = "apps.vms.middleware.VMReadFastPathMiddleware"
ACCEPTS = (
    "",
    "application/json",
    "*/*",
    "application/*",
    "application/json, text/html;q=0.5",
    "text/html",
    "application/json; indent=2",
    "application/xml",
)


class Fleet(NamedTuple):
    ids: list[str]  # the VMs
    projects: list[str]  # what a request may name: projects by id and by name, one nobody has


@pytest.fixture
def fleet(user: Any, other_user: Any, staff: Any, make_node: Any, image: Any) -> Fleet:
    """Eleven VMs of two owners in every state, one without a node, ties on ``created_at``; a third
    of them in a team project where alice is a member and bob a reader (staff are in none)."""
    team = Project.objects.create(name="team", **Project.default_quota())
    Membership.objects.create(project=team, user=user, role=Role.MEMBER)
    Membership.objects.create(project=team, user=other_user, role=Role.READER)
    node = make_node("node1")
    start = datetime(2026, 1, 1, tzinfo=UTC)
    ids = []
    states = ("running", "stopped", "deleted", "error", "pending")
    for index in range(11):
        vm = VM.objects.create(
            owner=user if index % 3 else other_user,
            **({"project": team} if index % 3 == 1 else {}),  # else the owner's personal project
            name=f"vm-{index}",
            image=image,
            node=None if index == 4 else node,
            state=states[index % len(states)],
            vcpus=1,
            memory_mb=64,
            disk_gb=1,
        )
        moment = start + timedelta(seconds=index // 2, microseconds=0 if index < 5 else 500_000)
        VM.objects.filter(pk=vm.pk).update(created_at=moment, updated_at=moment)
        ids.append(str(vm.pk))
    personal = str(personal_project(user).pk)
    return Fleet(ids, [str(team.pk), "team", personal, "~alice", "424242", "~nobody"])


@pytest.fixture
def clients(user: Any, other_user: Any, staff: Any) -> Iterator[Callable[[str, bool], APIClient]]:
    """A client of a viewer (``anonymous`` has no token), with the fast path or without it."""
    tokens = {
        name: token_create(user=who).secret
        for name, who in (("alice", user), ("bob", other_user), ("staff", staff))
    }
    forget("apicache", "authtoken", "throttle")

    def client(viewer: str, fast: bool) -> APIClient:
        made = APIClient()  # a new handler: MIDDLEWARE is read at its first request
        if viewer in tokens:
            made.credentials(HTTP_AUTHORIZATION=f"Token {tokens[viewer]}")
        if not fast:
            made.handler.load_middleware()  # now, under the settings without the fast path
        return made

    yield client
    forget("apicache", "authtoken", "throttle")


def _without_fast_path() -> Any:
    return override_settings(MIDDLEWARE=[name for name in settings.MIDDLEWARE if name != FAST_PATH])


def _answer(response: Any, *, html: bool) -> tuple[Any, ...]:
    """What must match: status, bytes and headers; of a browsable page (whose form holds a new CSRF
    token each time) its status and kind."""
    if html:
        return response.status_code, response.headers.get("Content-Type"), response.headers.get("Allow")
    return (
        response.status_code,
        response.content,
        tuple(response.headers.get(name) for name in COMPARED_HEADERS),
    )


@st.composite
def requests(draw: st.DrawFn, fleet: Fleet) -> tuple[str, str, dict[str, str], int]:
    """A viewer, a path, headers and how many ``next`` links to follow."""
    viewer = draw(st.sampled_from(("alice", "bob", "staff", "anonymous")))
    headers = {}
    named = draw(st.sampled_from((None, None, *fleet.projects)))  # the project, in a header or the query
    in_query = named is not None and draw(st.booleans())
    if named is not None and not in_query:
        headers["HTTP_X_PROJECT"] = named
    accept = draw(st.sampled_from(ACCEPTS))
    if accept:
        headers["HTTP_ACCEPT"] = accept
    if draw(st.booleans()):  # a list page
        query: dict[str, str] = {"project": named} if in_query and named is not None else {}
        state = draw(st.sampled_from((None, "running", "stopped", "deleted", "error", "bogus")))
        if state is not None:
            query["state"] = state
        if draw(st.integers(0, 4)) == 0:
            query[draw(st.sampled_from(("node", "name")))] = draw(st.sampled_from(("node1", "vm-3", "none")))
        page_size = draw(st.sampled_from((None, 1, 2, 3)))
        if page_size is not None:
            query["page_size"] = str(page_size)
        path = "/api/v1/vms/" + (f"?{urlencode(query)}" if query else "")
        return viewer, path, headers, draw(st.integers(0, 2))
    vm_id = draw(st.sampled_from((*fleet.ids, "00000000-0000-0000-0000-000000000000", "-" * 36)))
    if draw(st.booleans()):
        vm_id = vm_id.upper()
    if draw(st.integers(0, 3)) == 0:
        headers["HTTP_IF_NONE_MATCH"] = draw(st.sampled_from(("*", '"nope"', "ETAG")))
    detail = f"/api/v1/vms/{vm_id}/" + (f"?{urlencode({'project': named})}" if in_query and named else "")
    return viewer, detail, headers, 0


@hypothesis_settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_every_read_path_gives_the_same_answer(fleet, clients, monkeypatch, data):
    viewer, path, headers, follow = data.draw(requests(fleet))
    fast_client = clients(viewer, True)
    fast_client.get("/api/v1/vms/?remember=token")  # DRF remembers the token (the memo the fast path reads)
    for _ in range(follow + 1):
        forget("apicache")
        with _without_fast_path():
            slow_client = clients(viewer, False)
            reference = slow_client.get(path, **headers)
            if headers.get("HTTP_IF_NONE_MATCH") == "ETAG":  # the tag of the VM as it is now
                headers = {**headers, "HTTP_IF_NONE_MATCH": reference.headers.get("ETag", '"none"')}
                forget("apicache")
                reference = slow_client.get(path, **headers)
            html = reference.headers.get("Content-Type", "").startswith("text/html")
            expected = _answer(reference, html=html)
            assert _answer(slow_client.get(path, **headers), html=html) == expected, "DRF's cached answer"
        forget("apicache")
        assert _answer(fast_client.get(path, **headers), html=html) == expected, "the fast path's miss"
        assert _answer(fast_client.get(path, **headers), html=html) == expected, "the fast path's hit"
        with monkeypatch.context() as portable:
            portable.setattr(db, "on_postgresql", lambda: False)  # the ORM paths, as on SQLite
            forget("apicache")
            assert _answer(fast_client.get(path, **headers), html=html) == expected, "the portable path"
            with _without_fast_path():
                forget("apicache")
                portable_drf = clients(viewer, False).get(path, **headers)
                assert _answer(portable_drf, html=html) == expected, "the portable path through DRF"
        if reference.status_code == 200 and "indent" in headers.get("HTTP_ACCEPT", ""):
            named = {key: value for key, value in headers.items() if key == "HTTP_X_PROJECT"}
            compact = fast_client.get(path, HTTP_ACCEPT="application/json", **named)
            assert orjson.loads(reference.content) == orjson.loads(compact.content), "the serializer's VMs"
        page = orjson.loads(reference.content) if reference.status_code == 200 and not html else {}
        following = page.get("next")  # a list page's (a detail has no such key)
        if following is None:
            break
        parts = urlsplit(following)
        path = f"{parts.path}?{parts.query}"
