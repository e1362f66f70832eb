"""The VM read fast path: VM list pages and details answered before DRF runs.

A read through DRF costs about a millisecond of CPU on this machine before the view does anything:
token authentication (a query), the rate-limit counter and the cache look-up (two Redis round
trips), content negotiation and the view machinery. For ``GET /api/v1/vms/`` and
``GET /api/v1/vms/<id>/`` with a token and a JSON answer wanted, this middleware makes one Redis
call (:func:`.cache.fast_lookup`: token memo -> user -> entry -> rate window). On a hit it sends the
cached bytes with the headers DRF would have sent; on a miss it reads the page or VM with the fixed
SQL of :mod:`.reads` (the same function the DRF view uses), stores it and sends it the same way.
Everything else, an unknown token (no memo: DRF authenticates and writes it), a request over its
rate limit, a query only the ORM path answers (the ``node`` and ``name`` filters), a VM that is not
there, another media type or Redis away, goes on to DRF unchanged, which answers and fills the cache
(a request counted here is not counted again by DRF's throttle). The answer is the same either way
(``tests/apps/vms/test_fast_path.py`` compares them).

The middleware sits after the security and frame-options middleware in ``MIDDLEWARE``, whose headers
its answers get as DRF's do, and before the session, CSRF, authentication and messages middleware,
which add nothing to these answers (``CommonMiddleware``'s Content-Length is set here). It tells the
monitoring middleware who asked (``request.user``) and which route answered, for the API log.
"""

import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import xxhash
from django.db import DatabaseError, connection
from django.http import HttpRequest, HttpResponse, HttpResponseBase, HttpResponseNotModified

from apps.core.retry import lost_connection
from apps.core.throttling import COUNTED_ATTR, user_window
from apps.monitoring.middleware import ROUTE_HINT

from . import cache as vm_cache
from . import reads

LIST_PATH: Final = "/api/v1/vms/"
_DETAIL_PATH = re.compile(r"^/api/v1/vms/(?P<pk>[0-9a-fA-F-]{36})/$")
# What DRF sends with these answers (``APIView.default_response_headers``; checked by the tests).
LIST_ALLOW: Final = "GET, POST, HEAD, OPTIONS"
DETAIL_ALLOW: Final = "GET, PATCH, DELETE, HEAD, OPTIONS"
# Accept values that DRF's negotiation answers with the compact JSON renderer.
_JSON_ACCEPT: Final = frozenset({"", "*/*", "application/json", "application/*"})


@dataclass(frozen=True)
class FastPathUser:
    """The caller of a fast-path answer, as far as the API log reads it (no model instance made)."""

    pk: int
    is_staff: bool
    is_authenticated = True
    is_anonymous = False


def _token(request: HttpRequest) -> str | None:
    scheme, _, key = request.META.get("HTTP_AUTHORIZATION", "").partition(" ")
    key = key.strip()
    if scheme.lower() != "token" or not key or " " in key:
        return None
    return key


def _wants_json(request: HttpRequest) -> bool:
    """Accept asks for nothing but (compact) JSON, and no ``format`` override is in the query."""
    if "format" in request.META.get("QUERY_STRING", "") and "format" in request.GET:  # parsed only then
        return False
    accept = request.META.get("HTTP_ACCEPT", "")
    parts = accept.split(",")
    return all(part.split(";")[0].strip() in _JSON_ACCEPT and "indent" not in part for part in parts)


def body_etag(body: bytes) -> str:
    return f'"{xxhash.xxh3_64_hexdigest(body)}"'


def etag_matches(request: HttpRequest, etag: str) -> bool:
    """``If-None-Match`` names ``etag`` (weak comparison: gzip turns tags weak) or is ``*``."""
    header = request.META.get("HTTP_IF_NONE_MATCH", "")
    if not header:
        return False
    tags = {tag.strip().removeprefix("W/") for tag in header.split(",")}
    return etag in tags or "*" in tags


class VMReadFastPathMiddleware:
    """Answers VM list and detail reads of callers known by their token's memo; passes the rest on."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        if request.method == "GET":
            response = self._answer(request)
            if response is not None:
                return response
        return self.get_response(request)

    def _answer(self, request: HttpRequest) -> HttpResponseBase | None:
        path = request.path_info
        if path == LIST_PATH:
            vm_id = None
        else:
            match = _DETAIL_PATH.match(path)
            if match is None:
                return None
            try:
                vm_id = str(uuid.UUID(match["pk"]))
            except ValueError:
                return None
        token = _token(request)
        if token is None or not _wants_json(request):
            return None
        query = request.META.get("QUERY_STRING", "")
        # The query parsed only when there is one (request.GET cost a cached page 3 % of its CPU).
        answer_misses = vm_id is not None or not query or reads.list_state(request.GET)[0]
        found = vm_cache.fast_lookup(
            token=token,
            vm_id=vm_id,
            query=query,
            throttle=user_window(time.time()),
            answer_misses=answer_misses,
        )
        if isinstance(found, vm_cache.FastHit):
            body = found.body
        elif isinstance(found, vm_cache.FastMiss):
            setattr(request, COUNTED_ATTR, True)  # whichever path answers, the request is counted
            missing = self._read(request, found.viewer, vm_id)
            if missing is None:
                return None  # no such VM or a cursor to refuse: DRF answers (404)
            found.entry.store(missing)
            vm_cache.count_lookup(found.entry.view, hit=False)
            body = missing
        else:
            return None
        request.user = FastPathUser(found.viewer.user_id, found.viewer.is_staff)  # type: ignore[assignment]
        setattr(request, ROUTE_HINT, LIST_PATH if vm_id is None else LIST_PATH + "{pk}/")
        response: HttpResponseBase
        if vm_id is None:
            response = HttpResponse(body, content_type="application/json")
        else:
            etag = body_etag(body)
            if etag_matches(request, etag):
                response = HttpResponseNotModified()
            else:
                response = HttpResponse(body, content_type="application/json")
            response["ETag"] = etag
        response["Allow"] = LIST_ALLOW if vm_id is None else DETAIL_ALLOW
        response["Vary"] = "Accept"
        if not response.has_header("Content-Length"):
            response["Content-Length"] = str(len(response.content))
        return response

    @staticmethod
    def _read(request: HttpRequest, viewer: vm_cache.Viewer, vm_id: str | None) -> bytes | None:
        """The page or VM from the database (:mod:`.reads`); None when DRF must answer."""
        if not reads.supported():
            return None
        try:
            if vm_id is None:
                return reads.vm_page(request, user_id=viewer.user_id, is_staff=viewer.is_staff)
            return reads.vm_detail(vm_id=vm_id, user_id=viewer.user_id, is_staff=viewer.is_staff)
        except DatabaseError as exc:
            if not lost_connection(exc):
                raise
            connection.close()  # DRF's path runs the read again on a healthy connection (apps/core/retry.py)
            return None
