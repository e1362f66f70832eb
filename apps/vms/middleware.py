"""The VM read fast path: a cache in front of ``VMViewSet``'s list and detail, answered before DRF.

A read through DRF costs about a millisecond of CPU on this machine before the view does anything:
token authentication (a query), the rate-limit counter and the cache look-up (two Redis round
trips), content negotiation and the view machinery. For ``GET`` of the VM list and detail routes
with a token, this middleware makes one Redis call (:func:`.fast_lookup.fast_lookup`: token memo ->
the caller, the project the request acts in (named by id, else their personal one) and their role
there -> entry -> the view's rate counters). On a hit it sends the cached bytes; on a miss it reads
the page or VM with :mod:`.reads` (the function the view calls), stores it and sends it.

It holds no copy of the view: what it applies is the view's and DRF's, read at the first request
(:class:`_Route`; again when settings change): the routes (the URLconf's, with the view's lookup
regex), the negotiation (the view's, its answer remembered per ``Accept`` and ``format``), the
permission classes (run per request by the view's own ``check_permissions``, the user being the
memo's, :class:`apps.core.context.MemoUser`, and where it acts the memo's, in the request's
context), the throttles (each a
:class:`apps.core.throttling.WindowRateThrottle`, whose counters the look-up increments), the answer
(:func:`.views.vm_read_response`, ETag and 304 included) and the view's headers (its own
``finalize_response``). Anything it cannot answer so goes on to DRF unchanged, which answers and
fills the cache: an unknown token (no memo: DRF authenticates and writes it), a project named by
name or one the caller has no role in (DRF answers 404, or the project for staff), a refused permission
(its count taken back, so DRF counts as it would), a detail under per-object permissions, a request
over a rate limit, a query only the ORM path answers, a VM that is not there, another media type, a
throttle it cannot count, or Redis away. The answer is the same either way
(``tests/apps/vms/test_fast_path.py``, ``tests/apps/vms/test_read_paths.py``).

The middleware sits after the security and frame-options middleware in ``MIDDLEWARE``, whose headers
its answers get as DRF's do, and before the session, CSRF, authentication and messages middleware,
which add nothing to these answers (``CommonMiddleware``'s Content-Length is set here). The caller
goes into ``request.user`` and the route into the monitoring middleware's hint, for the API log;
the rate scopes it counted into the request's context (:func:`apps.core.context.request_context`).
"""

import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from django.core.signals import setting_changed
from django.db import DatabaseError, connection
from django.dispatch import receiver
from django.http import HttpRequest, HttpResponse, HttpResponseBase
from django.urls import get_script_prefix, resolve, reverse
from rest_framework.authentication import TokenAuthentication
from rest_framework.exceptions import APIException
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.request import Request
from rest_framework.settings import api_settings
from rest_framework.views import APIView

from apps.core.context import MemoUser, Viewer, request_context
from apps.core.ids import uuid_text
from apps.core.retry import lost_connection
from apps.core.throttling import KnownUserCounter, WindowRateThrottle
from apps.monitoring.middleware import ROUTE_HINT, route_pattern
from apps.projects.acting import PROJECT_META, PROJECT_PARAM

from . import cache as vm_cache
from . import fast_lookup as fast
from . import reads
from .views import checks_objects, plain_json, vm_read_response

# Remembered negotiation answers: (Accept, format) -> compact JSON or not; emptied when full.
_NEGOTIATED_MAX: Final = 256
_ANSWERABLE: Final = (fast.FastHit, fast.FastMiss)


def _token(request: HttpRequest, keyword: str) -> str | None:
    """The key of ``Authorization: <keyword> <key>``, split as DRF's token authentication splits it."""
    parts = request.META.get("HTTP_AUTHORIZATION", "").split()
    if len(parts) != 2 or parts[0].lower() != keyword:
        return None
    return parts[1]


def _countable(view: APIView) -> tuple[WindowRateThrottle, ...] | None:
    """The view's throttles if each can be counted in Redis for a caller known by id, else None."""
    throttles = view.get_throttles()
    if all(isinstance(throttle, WindowRateThrottle) for throttle in throttles):
        return tuple(throttle for throttle in throttles if isinstance(throttle, WindowRateThrottle))
    return None


@dataclass
class _Route:
    """One route of ``VMViewSet`` as DRF would serve it: its view, negotiation and headers."""

    view: Any  # the URLconf's view function (with DRF's ``cls``, ``initkwargs``, ``actions``)
    token_keyword: str | None  # lower case; None: the view does not authenticate by token first
    monitored_as: str  # the route as the API log names it
    headers: dict[str, str]  # what the view's finalize_response adds to a new answer (Allow, Vary)
    throttle_classes: Any  # the view's, which ``throttles`` were made of
    throttles: tuple[WindowRateThrottle, ...] | None  # None: a throttle this path cannot count
    negotiated: dict[tuple[str, str | None], bool]
    scopes: frozenset[str] | None = None  # the scopes of :meth:`counters`, made with the throttles

    @classmethod
    def of(cls, path: str) -> "_Route":
        match = resolve(path)
        view: Any = match.func
        prototype = cls._view(view, match.kwargs, handlers=True)
        authenticators = prototype.get_authenticators()
        first = authenticators[0] if authenticators else None
        keyword = first.keyword.lower() if isinstance(first, TokenAuthentication) else None
        probe = HttpRequest()
        probe.path_info = path
        probe.resolver_match = match
        # The view's own finalize_response, once, on a new answer: the headers DRF adds to each.
        prototype.headers = prototype.default_response_headers
        # (DRF's stubs say Response; DRF takes any HttpResponseBase, as it asserts.)
        finalized = prototype.finalize_response(Request(probe), HttpResponse(), **match.kwargs)  # type: ignore[arg-type]
        added = {name: value for name, value in finalized.items() if name != "Content-Type"}
        return cls(
            view=view,
            token_keyword=keyword,
            monitored_as=route_pattern(probe),
            headers=added,
            throttle_classes=prototype.throttle_classes,
            throttles=_countable(prototype),
            negotiated={},
        )

    @staticmethod
    def _view(view: Any, kwargs: dict[str, Any], *, handlers: bool = False) -> APIView:
        """The view instance DRF's ``ViewSetMixin.as_view`` makes for a GET of this route (its
        ``view`` closure, without dispatching); with ``handlers``, the actions bound as the methods'
        handlers, HEAD as GET (what its ``Allow`` header is made of)."""
        instance: Any = view.cls(**view.initkwargs)
        instance.action_map = view.actions
        if handlers:
            for method, action in {"head": view.actions["get"], **view.actions}.items():
                setattr(instance, method, getattr(instance, action))
        instance.action = view.actions["get"]
        instance.args, instance.kwargs = (), kwargs
        instance.format_kwarg = None
        assert isinstance(instance, APIView)
        return instance

    def counters(self, view: APIView, now: float) -> list[KnownUserCounter] | None:
        """The view's throttles' counters of the caller now; None: one cannot be counted here.

        The throttles are made again when the view's classes change (a test adds one)."""
        if view.throttle_classes is not self.throttle_classes:
            self.throttle_classes = view.throttle_classes
            self.throttles = _countable(view)
            self.scopes = None
        if self.throttles is None:
            return None
        counters = [counter for throttle in self.throttles if (counter := throttle.known_user_counter(now))]
        if self.scopes is None:
            self.scopes = frozenset(counter.scope for counter in counters)
        return counters

    def wants_plain_json(self, request: HttpRequest, drf_request: Request, view: APIView) -> bool:
        """The view's content negotiation chose compact JSON, remembered per ``Accept`` and ``format``
        (DRF's default negotiation reads nothing else; another negotiation class is asked each time)."""
        override = api_settings.URL_FORMAT_OVERRIDE
        query = request.META.get("QUERY_STRING", "")
        chosen = request.GET.get(override) if override and override in query else None  # parsed only then
        memo_key = (request.META.get("HTTP_ACCEPT", ""), chosen)
        remembered = type(view.get_content_negotiator()) is DefaultContentNegotiation
        found = self.negotiated.get(memo_key) if remembered else None
        if found is None:
            try:
                renderer, media_type = view.perform_content_negotiation(drf_request)
            except APIException:
                found = False  # 406: DRF says so
            else:
                found = plain_json(renderer, media_type)
            if remembered:
                if len(self.negotiated) >= _NEGOTIATED_MAX:
                    self.negotiated.clear()
                self.negotiated[memo_key] = found
        return found

    def permitted(self, view: APIView, drf_request: Request) -> bool:
        try:
            view.check_permissions(drf_request)
        except APIException:
            return False
        return True

    def finish(self, response: HttpResponseBase) -> HttpResponseBase:
        """The headers the view's ``finalize_response`` adds (:meth:`of`); the Content-Length
        (``CommonMiddleware``'s, which these answers skip)."""
        for name, value in self.headers.items():
            response[name] = value
        response["Content-Length"] = str(len(response.content))  # type: ignore[attr-defined]
        return response


@dataclass(frozen=True)
class _Routes:
    list_path: str
    detail_path: re.Pattern[str]
    list: _Route
    detail: _Route


_routes: list[_Routes] = []  # made once per process, at the first request (the URLconf loaded)
_routes_lock = threading.Lock()


@receiver(setting_changed)
def _settings_changed(*, setting: str, **kwargs: Any) -> None:
    """The routes are read again after a change of what they are made of (tests change settings)."""
    if setting in {"REST_FRAMEWORK", "ROOT_URLCONF", "CACHE_KEY_PREFIX"}:
        with _routes_lock:
            _routes.clear()


def _load_routes() -> _Routes:
    with _routes_lock:
        if not _routes:
            prefix = get_script_prefix()
            list_path = "/" + reverse("vm-list").removeprefix(prefix)
            sample = str(uuid.UUID(int=0))
            detail_path = "/" + reverse("vm-detail", kwargs={"pk": sample}).removeprefix(prefix)
            route = _Route.of(detail_path)
            head, tail = detail_path.split(sample)
            lookup = route.view.cls.lookup_value_regex
            pattern = re.compile(f"^{re.escape(head)}(?P<pk>{lookup}){re.escape(tail)}$")
            _routes.append(_Routes(list_path, pattern, _Route.of(list_path), route))
        return _routes[0]


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
        routes = _routes[0] if _routes else _load_routes()
        path = request.path_info
        vm_id: str | None = None
        if path == routes.list_path:
            route = routes.list
        else:
            match = routes.detail_path.match(path)
            if match is None:
                return None
            vm_id = uuid_text(match["pk"])
            if vm_id is None:
                return None
            route = routes.detail
        token = None if route.token_keyword is None else _token(request, route.token_keyword)
        if token is None:
            return None
        view = _Route._view(route.view, {} if vm_id is None else {"pk": vm_id})
        drf_request = Request(request, negotiator=view.get_content_negotiator())
        view.request = drf_request
        if not route.wants_plain_json(request, drf_request, view):
            return None
        if vm_id is not None and checks_objects(view):
            return None  # per-object permissions: DRF's get_object checks them
        counters = route.counters(view, time.time())
        if counters is None:
            return None
        query = request.META.get("QUERY_STRING", "")
        named = request.META.get(PROJECT_META) or (
            request.GET.get(PROJECT_PARAM) if PROJECT_PARAM in query else None
        )
        if named is not None and not named.isdigit():
            return None  # a project named by name (or not at all well): DRF resolves it
        # The query parsed only when there is one (request.GET cost a cached page 3 % of its CPU).
        answer_misses = vm_id is not None or not query or reads.list_state(request.GET)[0]
        found = fast.fast_lookup(
            token=token,
            project=named,
            vm_id=vm_id,
            query=query,
            counters=counters,
            answer_misses=answer_misses,
        )
        if not isinstance(found, _ANSWERABLE):
            return None  # unknown token, no entry to answer from, over a rate limit, or Redis away
        # Also request.user (the API log reads it); a user without its row (MemoUser), not a model.
        drf_request.user = MemoUser(found.viewer)  # type: ignore[assignment]
        context = request_context(request)
        context.acting = found.acting
        if not route.permitted(view, drf_request):
            fast.fast_uncount(found.viewer.user_id, counters)
            context.acting = None  # DRF resolves it again, for its own caller
            return None  # DRF refuses it, before its throttles count it
        context.counted_scopes = route.scopes or frozenset()
        if isinstance(found, fast.FastHit):
            body = found.body
        else:
            missing = self._read(drf_request, found.viewer, vm_id)
            if missing is None:
                return None  # no such VM or a cursor to refuse: DRF answers (404), uncounted again
            found.entry.store(missing)
            vm_cache.count_lookup(found.entry.view, hit=False)
            body = missing
        setattr(request, ROUTE_HINT, route.monitored_as)
        return route.finish(vm_read_response(request.META, body, detail=vm_id is not None))

    @staticmethod
    def _read(request: Request, viewer: Viewer, vm_id: str | None) -> bytes | None:
        """The page or VM from the database (:mod:`.reads`); None when DRF must answer."""
        try:
            if vm_id is None:
                return reads.vm_page(request, viewer=viewer)
            return reads.vm_detail(vm_id=vm_id, viewer=viewer)
        except DatabaseError as exc:
            if not lost_connection(exc):
                raise
            connection.close()  # DRF's path runs the read again on a healthy connection (apps/core/retry.py)
            return None
