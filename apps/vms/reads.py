"""The VM list page and VM detail as JSON bytes from fixed SQL, without the ORM, serializers or django-filter.

It skips what an uncached page does not need: django-filter's form and filter copies, the ORM's
query compilation and queryset clones, and Django's pure-Python timestamp loader (Django's subclass
bypasses psycopg's C loader). Here a page is one SQL string per shape (staff or owner, ``state`` or
not, cursor direction), built once per process from fixed identifiers, with psycopg's C loaders for
its rows.

What it answers is exactly what the ORM path answered (``tests/apps/vms/test_reads.py`` compares
them): the same rows in the same order (``-created_at, -id``), ``VMSerializer``'s shape and
bytes (timestamps written by orjson), and the cursor links of ``CreatedCursorPagination``, whose own
``get_next_link``/``get_previous_link`` write them. Queries it does not cover (the
``node`` and ``name`` filters, an invalid ``state``, ``format``, an undecodable cursor) return
``None`` and the caller takes the ORM path, which answers them (400, 404...) as before.

Used by the fast path (``middleware.py``, a cache miss of a caller known by their token's memo) and
by the DRF view (the same miss after DRF's authentication), so both paths give the same bytes.
"""

from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any, Final

from django.contrib.auth import get_user_model
from django.db import connection
from django.http import HttpRequest, QueryDict
from django.utils.dateparse import parse_datetime
from rest_framework.exceptions import NotFound
from rest_framework.request import Request

from apps.core.db import fetch_prepared
from apps.core.pagination import CreatedCursorPagination
from apps.core.renderers import dumps

from .choices import VMState
from .models import VM, Image, Node

#: Query parameters that the ORM path alone answers (django-filter's filters other than ``state``).
ORM_ONLY_PARAMS: Final = frozenset({"node", "name", "format"})
_VALID_STATES: Final = frozenset(VMState.values)
# ``VMSerializer``'s fields, in its order, and the columns they come from.
_COLUMNS: Final = (
    ("id", "v.id::text"),
    ("name", "v.name"),
    ("owner", "u.username"),
    ("node", "n.name"),
    ("image", "i.name"),
    ("state", "v.state"),
    ("state_reason", "v.state_reason"),
    ("pending_action", "v.pending_action"),
    ("vcpus", "v.vcpus"),
    ("memory_mb", "v.memory_mb"),
    ("disk_gb", "v.disk_gb"),
    ("created_at", "v.created_at"),
    ("updated_at", "v.updated_at"),
)
_NAMES: Final = tuple(name for name, _ in _COLUMNS)


@cache
def select_sql(source: str = "", extra: tuple[str, ...] = ()) -> str:
    """The join of VMs with their owner, node and image, tables named by the models.

    ``source``: where the VM rows come from (a common table expression's name); the VM table if empty.
    ``extra``: further columns of the VM rows, after ``VMSerializer``'s (:func:`rows` names them).
    """
    quote = connection.ops.quote_name
    tables = [quote(model._meta.db_table) for model in (VM, get_user_model(), Node, Image)]
    columns = [column for _, column in _COLUMNS] + [f"v.{quote(name)}" for name in extra]
    return (
        f"SELECT {', '.join(columns)} FROM {source or tables[0]} v "  # noqa: S608
        f"JOIN {tables[1]} u ON u.id = v.owner_id LEFT JOIN {tables[2]} n ON n.id = v.node_id "
        f"JOIN {tables[3]} i ON i.id = v.image_id"
    )


@dataclass(frozen=True)
class PageShape:
    """What decides a page's SQL text (its parameters are the owner and the cursor's position)."""

    staff: bool
    state: str | None  # filtered on this state (deleted ones included); else every state but deleted
    position: str  # "" (first page), "<" or ">" (before or after the cursor's position)
    reverse: bool  # a "previous" cursor: read oldest first, then turn the page around


@cache
def page_sql(shape: PageShape) -> str:
    """The SQL of one page shape without its LIMIT and OFFSET (:func:`page_window`; built once).

    Parameters, in order: the owner's id (not for staff), the cursor's position (with ``position``).
    The state is written into the SQL (one of :class:`VMState`'s values, checked here) and so are the
    LIMIT and OFFSET: a prepared statement may get one generic plan (:func:`fetch_prepared`), and
    PostgreSQL plans ``state = $1`` without the partial index of error VMs and a ``LIMIT $n`` as a
    tenth of the rows.
    """
    where = [] if shape.staff else ["v.owner_id = %s"]
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
    """Rows of :func:`select_sql` in ``VMSerializer``'s shape (then ``extra``'s columns), timestamps
    still datetimes (``dumps(utc_datetimes=True)`` writes them as DRF does); a prepared statement."""
    names = _NAMES + extra
    return [dict(zip(names, row, strict=True)) for row in fetch_prepared(sql, params)]


class _Pagination(CreatedCursorPagination):
    """DRF's cursor pagination with its page read by :func:`page_sql` instead of a queryset."""

    def read_page(
        self, request: Request, *, owner_id: int | None, state: str | None
    ) -> list[dict[str, Any]] | None:
        """The page's rows, the pagination state set for DRF's link methods; None: an invalid cursor."""
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
            staff=owner_id is None,
            state=state,
            position="" if moment is None else (">" if reverse else "<"),
            reverse=reverse,
        )
        params: list[Any] = [] if owner_id is None else [owner_id]
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


def supported() -> bool:
    """Whether this database runs the SQL here: PostgreSQL's (casts, psycopg's loaders). On another
    (the SQLite file ``make run`` uses without ``DATABASE_URL``) the ORM path answers every read."""
    return connection.vendor == "postgresql"


def list_state(query: QueryDict) -> tuple[bool, str | None]:
    """Whether :func:`vm_page` answers ``query``, and the state it filters on."""
    if any(name in query for name in ORM_ONLY_PARAMS):
        return False, None
    if "state" not in query:
        return True, None
    state = query.get("state")
    return (True, state) if state in _VALID_STATES and len(query.getlist("state")) == 1 else (False, None)


def vm_page(request: HttpRequest | Request, *, user_id: int, is_staff: bool) -> bytes | None:
    """One VM list page as DRF's JSON body, or None when the ORM path must answer the query."""
    drf_request = request if isinstance(request, Request) else Request(request)
    answerable, state = list_state(drf_request.query_params)
    if not answerable or not supported():
        return None
    pagination = _Pagination()
    rows = pagination.read_page(drf_request, owner_id=None if is_staff else user_id, state=state)
    if rows is None:
        return None
    body = {
        "next": pagination.get_next_link(),
        "previous": pagination.get_previous_link(),
        "results": rows,
    }
    return dumps(body, utc_datetimes=True)


@cache
def detail_sql(*, owned: bool) -> str:
    """The SQL of one VM by id (parameters: the id, then the owner's id when ``owned``)."""
    sql = f"{select_sql()} WHERE v.id = %s"
    return f"{sql} AND v.owner_id = %s" if owned else sql


def vm_detail(*, vm_id: str, user_id: int, is_staff: bool) -> bytes | None:
    """One VM the caller may see (deleted ones included) as ``VMSerializer``'s JSON; None: no such VM.

    PostgreSQL only (:func:`supported`)."""
    found = (
        rows(detail_sql(owned=False), [vm_id]) if is_staff else rows(detail_sql(owned=True), [vm_id, user_id])
    )
    return dumps(found[0], utc_datetimes=True) if found else None
