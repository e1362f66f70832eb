"""The VM as the API shows it, declared once: :data:`VM_FIELDS`.

A field is one :class:`VMField`: its JSON name, its ORM path from the VM (``owner__username``), its
SQL expression over the fixed join (derived from the ORM path unless given) and, if the loaded value
is not already what the API shows, a formatter. Everything else is derived from the declaration:

- the fixed SQL's select list and joins (:func:`select_sql`, read by :mod:`.reads` and the rename);
- the ORM fallback's ``values_list`` paths (:func:`orm_paths`) and the values read from a model
  instance (:func:`vm_data`);
- ``VMSerializer``'s fields and its representation (:mod:`.serializers`);
- the cached entries, which are these dicts' bytes.

One row shape for every source: a tuple of the loaded values in declaration order, turned into the
API's dict by :func:`row_data`, the one place formatters run. The values are what DRF's serializer
fields give, or what orjson (``dumps(utc_datetimes=True)``) and DRF's JSON encoder both write as
those fields would: UUIDs (or their text), strings, integers, None and aware datetimes in UTC (the
PostgreSQL session's zone and Django's converters give UTC).

Adding a field to the API is one line here plus the model's migration. A field that is no column of
the VM or its foreign keys (``nics``, rows of another table) declares its SQL, ORM annotation and
instance reader itself.
"""

import hashlib
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import orjson
from django.db import connection, models
from django.db.models.expressions import Expression, RawSQL

from apps.core.db import on_postgresql
from apps.networks.nics import nics_shown
from apps.networks.serializers import NicShownSerializer

from .models import VM


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: a cache key, cheap to hash
class VMField:
    """One field of the API's VM: ``name`` in the JSON, read from ``orm`` (a path from the VM).

    A field that is no column (a list of related rows) gives its ``sql``, an ORM ``annotation``
    (named ``orm``) for the ORM fallback, how to ``read`` it from an instance, and its API field.
    """

    name: str
    orm: str
    sql: str | None = None  # default: the ORM path's column, ``v.<column>`` or ``<relation>.<column>``
    render: Callable[[Any], Any] | None = None  # the loaded value as the API shows it; default: as is
    annotation: Callable[[], Expression] | None = None  # the ORM's expression of ``orm``
    read: Callable[[Any], Any] | None = None  # the value of a VM instance (default: its ``orm`` path)
    api_field: Callable[[], Any] | None = None  # the serializer field (default: the model field's)

    @property
    def relation(self) -> str | None:
        """The VM's foreign key this field is read through, if any (``owner`` for ``owner__username``)."""
        head, _, rest = self.orm.partition("__")
        return head if rest else None


# A VM's NICs in index order, one JSON array per VM row (a correlated subquery on the unique index
# of (vm, index)): [{network, mac, ipv4}]. As text, which :func:`_json_list` loads, whatever JSON
# loader the connection has.
_NICS_SQL = """(SELECT coalesce(json_agg(json_build_object('network', n.name, 'mac', c.mac, 'ipv4', c.ipv4)
ORDER BY c."index"), '[]')::text
FROM nics c JOIN networks n ON n.id = c.network_id WHERE c.vm_id = {vm}.id)"""
# SQLite (``make run``): json_group_array of rows ordered in a subquery (SQLite keeps that order).
_NICS_SQLITE = """(SELECT json_group_array(json_object('network', o.name, 'mac', o.mac, 'ipv4', o.ipv4))
FROM (SELECT n.name, c.mac, c.ipv4 FROM nics c JOIN networks n ON n.id = c.network_id
WHERE c.vm_id = "vms".id ORDER BY c."index") o)"""


def _nics_annotation() -> Expression:
    # Fixed text, no parameter: nothing of a request reaches it.
    return RawSQL(_NICS_SQL.format(vm='"vms"') if on_postgresql() else _NICS_SQLITE, ())  # noqa: S611


def _json_list(value: Any) -> Any:
    """A JSON array loaded from its text (the SQL paths); a list (an instance's) as it is."""
    return orjson.loads(value) if isinstance(value, (str, bytes)) else value


def _nics_api_field() -> Any:
    return NicShownSerializer(many=True, read_only=True, help_text="The VM's NICs, in guest order.")


VM_FIELDS: tuple[VMField, ...] = (
    VMField("id", "id", sql="v.id::text"),  # text: psycopg's UUID loader is Python, the text one C
    VMField("name", "name"),
    VMField("owner", "owner__username"),
    VMField("project", "project__name"),
    VMField("node", "node__name"),
    VMField("image", "image__name"),
    VMField("state", "state"),
    VMField("state_reason", "state_reason"),
    VMField("pending_action", "pending_action"),
    VMField("vcpus", "vcpus"),
    VMField("memory_mb", "memory_mb"),
    VMField("disk_gb", "disk_gb"),
    VMField("hostname", "hostname"),
    VMField("ssh_keys", "ssh_keys", sql="v.ssh_keys::text", render=_json_list),  # user_data: never shown
    VMField("created_at", "created_at"),
    VMField("updated_at", "updated_at"),
    VMField(
        "nics",
        "nic_list",
        sql=_NICS_SQL.format(vm="v"),
        render=_json_list,
        annotation=_nics_annotation,
        read=nics_shown,
        api_field=_nics_api_field,
    ),
)


@cache
def _layout(
    fields: tuple[VMField, ...], extra: tuple[str, ...]
) -> tuple[tuple[str, ...], tuple[tuple[str, Callable[[Any], Any]], ...]]:
    """The dict keys of a row and the formatters to run (computed once per declaration)."""
    keys = (*(field.name for field in fields), *extra)
    return keys, tuple((field.name, field.render) for field in fields if field.render is not None)


@cache
def _fingerprint(fields: tuple[VMField, ...]) -> str:
    # Functions by qualified name: their repr holds an address that differs between processes.
    declared = "|".join(
        f"{field.name}={field.orm}={field.sql}={getattr(field.render, '__qualname__', None)}"
        for field in fields
    )
    return hashlib.blake2b(declared.encode(), digest_size=4).hexdigest()


def fingerprint() -> str:
    """A short digest of the declaration: cached bodies are keyed by it, so a deploy that adds a
    field never serves bodies made before it."""
    return _fingerprint(VM_FIELDS)


def names() -> tuple[str, ...]:
    return _layout(VM_FIELDS, ())[0]


def orm_paths() -> tuple[str, ...]:
    """The ORM fallback's ``values_list`` paths, in declaration order (rows for :func:`row_data`)."""
    return tuple(field.orm for field in VM_FIELDS)


def annotations() -> dict[str, Expression]:
    """The ORM expressions of the fields that are no column, by their ``orm`` name (``annotate``)."""
    return {field.orm: field.annotation() for field in VM_FIELDS if field.annotation is not None}


def relations() -> tuple[str, ...]:
    """The foreign keys the fields are read through (``select_related`` of a model read)."""
    return tuple(dict.fromkeys(field.relation for field in VM_FIELDS if field.relation is not None))


def model_field(path: str) -> models.Field[Any, Any]:
    """The model field at the end of an ORM path from the VM."""
    model: Any = VM
    *hops, last = path.split("__")
    for hop in hops:
        model = model._meta.get_field(hop).related_model
    found = model._meta.get_field(last)
    assert isinstance(found, models.Field), path
    return found


def nullable(path: str) -> bool:
    """Whether the value at ``path`` can be None (its column, or a foreign key on the way, is nullable)."""
    *hops, _ = path.split("__")
    return model_field(path).null or any(model_field(hop).null for hop in hops)


@cache
def _select_sql(fields: tuple[VMField, ...], source: str, extra: tuple[str, ...]) -> str:
    quote = connection.ops.quote_name
    select = []
    for field in fields:
        if field.sql is not None:
            select.append(field.sql)
        else:
            alias = "v" if field.relation is None else quote(field.relation)
            select.append(f"{alias}.{quote(str(model_field(field.orm).column))}")
    select += [f"v.{quote(name)}" for name in extra]
    joins = []
    for relation in dict.fromkeys(field.relation for field in fields if field.relation is not None):
        foreign_key = model_field(relation)
        target = foreign_key.related_model
        assert target is not None and not isinstance(target, str) and target._meta.pk is not None, relation
        join = "LEFT JOIN" if foreign_key.null else "JOIN"
        joins.append(
            f"{join} {quote(target._meta.db_table)} {quote(relation)} "
            f"ON {quote(relation)}.{quote(str(target._meta.pk.column))} = v.{quote(str(foreign_key.column))}"
        )
    table = source or quote(VM._meta.db_table)
    return f"SELECT {', '.join(select)} FROM {table} v {' '.join(joins)}"  # noqa: S608 (identifiers only)


def select_sql(source: str = "", extra: tuple[str, ...] = ()) -> str:
    """The select list and joins of :data:`VM_FIELDS` over the VM rows aliased ``v`` (built once).

    ``source``: where the VM rows come from (a common table expression's name); the VM table if empty.
    ``extra``: further columns of the VM rows after the fields (:func:`row_data` leaves them as they are).
    """
    return _select_sql(VM_FIELDS, source, extra)


def row_reader(extra: tuple[str, ...] = ()) -> Callable[[Sequence[Any]], dict[str, Any]]:
    """:func:`row_data` for many rows (the declaration read once)."""
    keys, renders = _layout(VM_FIELDS, extra)

    def read(row: Sequence[Any]) -> dict[str, Any]:
        data = dict(zip(keys, row, strict=True))
        for name, render in renders:
            data[name] = render(data[name])
        return data

    return read


def row_data(row: Sequence[Any], extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """A row of loaded values in declaration order (then ``extra``'s) as the API's dict."""
    return row_reader(extra)(row)


def _getter(path: str) -> Callable[[Any], Any]:
    """Reads ``path`` from a VM instance; None past a missing relation (a VM without a node)."""
    hops = path.split("__")
    if len(hops) == 1:
        return operator.attrgetter(path)
    head, rest = hops[0], operator.attrgetter(".".join(hops[1:]))

    def read(vm: Any) -> Any:
        related = getattr(vm, head)
        return None if related is None else rest(related)

    return read


@cache
def _getters(fields: tuple[VMField, ...]) -> tuple[Callable[[Any], Any], ...]:
    return tuple(field.read or _getter(field.orm) for field in fields)


def vm_data(vm: VM) -> dict[str, Any]:
    """The API's dict of a VM instance (its relations loaded: :func:`relations`; its NICs read
    unless prefetched with ``apps.networks.selectors.NICS_PREFETCH``)."""
    return row_data([read(vm) for read in _getters(VM_FIELDS)])
