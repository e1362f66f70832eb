"""The VM list page and VM detail as JSON bytes from fixed SQL, without the ORM, serializers or django-filter.

It skips what an uncached page does not need: django-filter's form and filter copies, the ORM's
query compilation and queryset clones, and Django's pure-Python timestamp loader (Django's subclass
bypasses psycopg's C loader). Here a page is one SQL string per shape (fleet or project, ``state`` or
not, cursor direction), built once per process from fixed identifiers, with psycopg's C loaders for
its rows.

What it answers is exactly what the ORM path answered (``tests/apps/vms/test_reads.py`` compares
them): the same rows in the same order (``-created_at, -id``), each VM as :mod:`.representation`
declares it (its select list and joins are derived from there; timestamps written by orjson), the
rows a viewer may see (:func:`.selectors.visible_project`), and the cursor links of
``CreatedCursorPagination``, whose own ``get_next_link``/``get_previous_link`` write them. Queries
it does not cover (the ``node`` and ``name`` filters, an invalid ``state``, ``format``, an
undecodable cursor) return ``None`` and the caller takes the ORM path, which answers them (400,
404...) as before.

Used by the fast path (``middleware.py``, a cache miss of a caller known by their token's memo) and
by the DRF view (the same miss after DRF's authentication), so both paths give the same bytes.
"""

from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any, Final

from django.http import HttpRequest, QueryDict
from django.utils.dateparse import parse_datetime
from rest_framework.exceptions import NotFound
from rest_framework.request import Request

from apps.core.context import Viewer
from apps.core.db import fetch_prepared, none_elsewhere, postgresql_or
from apps.core.pagination import CreatedCursorPagination
from apps.core.renderers import dumps

from . import representation
from .choices import VMState
from .selectors import visible_project, vm_row_data, vm_rows, vm_visible_to

#: Query parameters that the ORM path alone answers (django-filter's filters other than ``state``).
ORM_ONLY_PARAMS: Final = frozenset({"node", "name", "format"})
_VALID_STATES: Final = frozenset(VMState.values)


def select_sql(source: str = "", extra: tuple[str, ...] = ()) -> str:
    """The VMs joined with what :mod:`.representation` reads of them (:func:`representation.select_sql`)."""
    return representation.select_sql(source, extra)


@dataclass(frozen=True)
class PageShape:
    """What decides a page's SQL text (its parameters are the project and the cursor's position)."""

    fleet: bool  # every project's VMs (staff naming no project), else one project's
    state: str | None  # filtered on this state (deleted ones included); else every state but deleted
    position: str  # "" (first page), "<" or ">" (before or after the cursor's position)
    reverse: bool  # a "previous" cursor: read oldest first, then turn the page around


def page_sql(shape: PageShape) -> str:
    """The SQL of one page shape without its LIMIT and OFFSET (:func:`page_window`; built once per
    shape and declaration of the fields).

    Parameters, in order: the project's id (not for the fleet), the cursor's position (with ``position``).
    The state is written into the SQL (one of :class:`VMState`'s values, checked here) and so are the
    LIMIT and OFFSET: a prepared statement may get one generic plan (:func:`fetch_prepared`), and
    PostgreSQL plans ``state = $1`` without the partial index of error VMs and a ``LIMIT $n`` as a
    tenth of the rows.
    """
    return _page_sql(representation.VM_FIELDS, shape)


@cache
def _page_sql(fields: tuple[representation.VMField, ...], shape: PageShape) -> str:
    # ``fields``: only the cache's key (select_sql reads the same declaration).
    where = [] if shape.fleet else ["v.project_id = %s"]  # the project of :func:`selectors.visible_project`
    if shape.state is None:
        where.append("NOT (v.state = 'deleted')")
    else:
        assert shape.state in _VALID_STATES, shape.state
        where.append(f"v.state = '{shape.state}'")
    if shape.position:
        where.append(f"v.created_at {shape.position} %s")
    direction = "ASC" if shape.reverse else "DESC"
    return f"{select_sql()} WHERE {' AND '.join(where)} ORDER BY v.created_at {direction}, v.id {direction}"


def page_window(shape: PageShape, *, limit: int, offset: int) -> str:
    """:func:`page_sql` with its LIMIT and OFFSET (integers, written as such)."""
    return f"{page_sql(shape)} LIMIT {int(limit)} OFFSET {int(offset)}"


def rows(sql: str, params: list[Any] | dict[str, Any], extra: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Rows of :func:`select_sql` as the API's dicts (then ``extra``'s columns), timestamps still
    datetimes (``dumps(utc_datetimes=True)`` writes them as DRF does); a prepared statement."""
    read = representation.row_reader(extra)
    return [read(row) for row in fetch_prepared(sql, params)]


class _Pagination(CreatedCursorPagination):
    """DRF's cursor pagination with its page read by :func:`page_sql` instead of a queryset."""

    def read_page(
        self, request: Request, *, project_id: int | None, state: str | None
    ) -> list[dict[str, Any]] | None:
        """``project_id``: the project the page is limited to (None: every project's VMs)."""
        # The page's rows, the pagination state set for DRF's link methods; None: an invalid cursor.
        self.request = request
        page_size = self.get_page_size(request) or CreatedCursorPagination.page_size
        self.page_size = page_size
        self.base_url = request.build_absolute_uri()
        try:
            self.cursor = self.decode_cursor(request)
        except NotFound:
            return None
        offset, reverse = (self.cursor.offset, self.cursor.reverse) if self.cursor else (0, False)
        # DRF's stubs type the position as an int; decode_cursor gives the string of a created_at.
        position = None if self.cursor is None or self.cursor.position is None else str(self.cursor.position)
        moment: datetime | None = None
        if position is not None:
            moment = _aware(position)
            if moment is None:
                return None  # the ORM path says what it makes of that position
        # Keyset on -created_at: a forward cursor reads older rows, a reverse one newer rows.
        shape = PageShape(
            fleet=project_id is None,
            state=state,
            position="" if moment is None else (">" if reverse else "<"),
            reverse=reverse,
        )
        params: list[Any] = [] if project_id is None else [project_id]
        if moment is not None:
            params.append(moment)
        results = rows(page_window(shape, limit=page_size + 1, offset=offset), params)
        self.page = results[:page_size]
        following = str(results[-1]["created_at"]) if len(results) > len(self.page) else None
        if reverse:
            self.page.reverse()
            self.has_next = position is not None or offset > 0
            self.has_previous = following is not None
            self.next_position, self.previous_position = position, following
        else:
            self.has_next = following is not None
            self.has_previous = position is not None or offset > 0
            self.next_position, self.previous_position = following, position
        return self.page


def _aware(position: str) -> datetime | None:
    try:
        moment = parse_datetime(position)
    except ValueError:
        return None
    return moment if moment is not None and moment.tzinfo is not None else None


def list_state(query: QueryDict) -> tuple[bool, str | None]:
    """Whether :func:`vm_page` answers ``query``, and the state it filters on."""
    if any(name in query for name in ORM_ONLY_PARAMS):
        return False, None
    if "state" not in query:
        return True, None
    state = query.get("state")
    return (True, state) if state in _VALID_STATES and len(query.getlist("state")) == 1 else (False, None)


@postgresql_or(none_elsewhere)  # elsewhere (SQLite) the view's ORM path answers every page
def vm_page(request: HttpRequest | Request, *, viewer: Viewer) -> bytes | None:
    """One VM list page as DRF's JSON body, or None when the ORM path must answer the query."""
    drf_request = request if isinstance(request, Request) else Request(request)
    answerable, state = list_state(drf_request.query_params)
    if not answerable:
        return None
    pagination = _Pagination()
    rows = pagination.read_page(drf_request, project_id=visible_project(viewer), state=state)
    if rows is None:
        return None
    body = {
        "next": pagination.get_next_link(),
        "previous": pagination.get_previous_link(),
        "results": rows,
    }
    return dumps(body, utc_datetimes=True)


def detail_sql(*, of_project: bool) -> str:
    """The SQL of one VM by id (parameters: the id, then the project's id when ``of_project``)."""
    return _detail_sql(representation.VM_FIELDS, of_project)


@cache
def _detail_sql(fields: tuple[representation.VMField, ...], of_project: bool) -> str:
    # ``fields``: only the cache's key (select_sql reads the same declaration).
    sql = f"{select_sql()} WHERE v.id = %s"
    return f"{sql} AND v.project_id = %s" if of_project else sql


def _vm_detail_by_orm(*, vm_id: str, viewer: Viewer) -> bytes | None:
    row = vm_rows(vm_visible_to(viewer).filter(pk=vm_id)).first()
    return None if row is None else dumps(vm_row_data(row))


@postgresql_or(_vm_detail_by_orm)
def vm_detail(*, vm_id: str, viewer: Viewer) -> bytes | None:
    """One VM the viewer may see (deleted ones included) as the API's JSON; None: no such VM."""
    project = visible_project(viewer)
    if project is None:
        found = rows(detail_sql(of_project=False), [vm_id])
    else:
        found = rows(detail_sql(of_project=True), [vm_id, project])
    return dumps(found[0], utc_datetimes=True) if found else None
