"""Database helpers shared by the apps: inserts by COPY or one prepared statement, fixed statements
prepared on the server (rows or model instances), look-ups by one column, deletes of old rows in batches
(retention), and an index operation for migrations.

Every difference between PostgreSQL and another database (the SQLite file ``make run`` uses without
``DATABASE_URL``) is decided here, by :func:`on_postgresql`: a module with SQL of PostgreSQL's
(casts, arrays, ``FOR NO KEY UPDATE``, ``SKIP LOCKED``, COPY, prepared statements) declares it with
:func:`postgresql_or`, naming the portable implementation used elsewhere, instead of testing the
vendor itself.
"""

import enum
import functools
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, Final, ParamSpec, TypeVar

import psycopg
from django.db import connection, models, transaction
from django.db.migrations.operations import AddIndex
from django.utils import timezone
from psycopg.types.datetime import TimestamptzLoader

M = TypeVar("M", bound=models.Model)
P = ParamSpec("P")
R = TypeVar("R")


def on_postgresql() -> bool:
    """Whether the default database is PostgreSQL, which runs the project's fixed SQL."""
    return connection.vendor == "postgresql"


def text_agg(expression: str, separator: str) -> str:
    """SQL of an aggregate joining the texts of ``expression`` with ``separator`` (a literal)."""
    function = "string_agg" if on_postgresql() else "group_concat"
    return f"{function}({expression}, '{separator}')"


def postgresql_or(portable: Callable[..., Any]) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate a function written for PostgreSQL with the ``portable`` one (same parameters, a
    result of the same type) that answers on any other database."""

    def decorate(native: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(native)
        def either(*args: P.args, **kwargs: P.kwargs) -> R:
            return native(*args, **kwargs) if on_postgresql() else portable(*args, **kwargs)

        return either

    return decorate


def now_and_after_commit(action: Callable[[], None]) -> None:
    """Run ``action`` now and, inside a transaction, again once it commits: for dropping what others
    trust instead of the database (cache versions, token memos). Now, so this transaction's own later
    reads stop trusting it; after commit, so that no concurrent request that read the old rows
    stored them again in between."""
    action()
    if connection.in_atomic_block:
        transaction.on_commit(action)


def none_elsewhere(*args: Any, **kwargs: Any) -> None:
    """The portable side of a PostgreSQL-only shortcut whose caller takes its general path on None."""
    return None


# Below this many rows one INSERT costs no more than a COPY (which takes two round trips).
COPY_MIN_ROWS: Final = 50


def _plain(value: Any) -> Any:
    """A choices member as its value (psycopg would write an Enum by its name)."""
    return value.value if isinstance(value, enum.Enum) else value


def _copy(statement: str, rows: Iterable[list[Any]]) -> None:
    """One ``COPY ... FROM STDIN`` (:func:`_through_wrappers`: counted and logged as a query)."""

    def run(sql: str, params: Any, many: bool, context: dict[str, Any]) -> None:
        with context["cursor"].cursor.copy(sql) as copy:
            for row in rows:
                copy.write_row(row)

    _through_wrappers(run, statement, None)


def bulk_insert(objects: Sequence[M]) -> Sequence[M]:
    """Insert new model instances: on PostgreSQL one prepared INSERT for one row
    (:func:`_insert_one`), one COPY for many; ``bulk_create`` otherwise.

    Django's ``bulk_create`` of a thousand VMs builds one INSERT of 14,000 parameters, and psycopg's
    client-side binding quotes each in Python; COPY sends the rows through psycopg's C row writer
    instead. The instances must hold plain values (no
    expressions; choices members are written by value); ``auto_now``/``auto_now_add`` fields are set
    here as ``bulk_create`` would. A primary key set in Python (the VMs' UUIDs) is written; an
    auto-increment one is left to the database and, COPY returning nothing, not read back (the
    instances then keep ``pk`` None). Errors come as Django's (a unique violation is an
    ``IntegrityError``).
    """
    if on_postgresql() and len(objects) == 1:
        _insert_one(objects[0])
        return objects
    if not on_postgresql() or len(objects) < COPY_MIN_ROWS:
        return type(objects[0])._default_manager.bulk_create(objects) if objects else objects
    meta = objects[0]._meta
    fields = [field for field in meta.concrete_fields if not field.db_returning]  # auto ids: the database's
    stamped = [
        field.attname
        for field in fields
        if getattr(field, "auto_now", False) or getattr(field, "auto_now_add", False)
    ]
    columns = ", ".join(connection.ops.quote_name(str(field.column)) for field in fields)
    statement = f"COPY {connection.ops.quote_name(meta.db_table)} ({columns}) FROM STDIN"
    attnames = [field.attname for field in fields]
    for obj in objects:
        now = timezone.now()  # per row, as bulk_create's pre_save: lists page by (created_at, id)
        for attname in stamped:
            setattr(obj, attname, now)
    _copy(statement, ([_plain(getattr(obj, attname)) for attname in attnames] for obj in objects))
    for obj in objects:
        obj._state.adding = obj.pk is None
        obj._state.db = connection.alias
    return objects


@functools.cache
def _insert_statement(
    model: type[models.Model],
) -> tuple[str, tuple[models.Field[Any, Any], ...], tuple[str, ...]]:
    """The INSERT of one ``model`` row: the statement, the fields it writes, the columns it returns."""
    quote = connection.ops.quote_name
    meta = model._meta
    written = tuple(field for field in meta.concrete_fields if not field.db_returning)
    returning = meta.db_returning_fields
    columns = ", ".join(quote(str(field.column)) for field in written)
    values = ", ".join(["%s"] * len(written))
    statement = f"INSERT INTO {quote(meta.db_table)} ({columns}) VALUES ({values})"  # noqa: S608
    if returning:
        statement += " RETURNING " + ", ".join(quote(str(field.column)) for field in returning)
    return statement, written, tuple(str(field.attname) for field in returning)


def _insert_one(obj: models.Model) -> None:
    """INSERT ``obj`` as a prepared statement (:func:`fetch_prepared`), as ``save()`` of a new row
    would: each field's ``pre_save`` (timestamps) and value prepared for the database; ids the
    database assigns are set. ``bulk_create`` of one VM compiled its INSERT on every create, and
    PostgreSQL planned it every time (0.5 ms for the 8 indexes of ``vms``, the statement log)."""
    statement, written, returned = _insert_statement(type(obj))
    values = [_plain(field.get_db_prep_save(field.pre_save(obj, True), connection)) for field in written]
    rows = fetch_prepared(statement, values)
    for attname, value in zip(returned, rows[0] if returned else (), strict=True):
        setattr(obj, attname, value)
    obj._state.adding = False
    obj._state.db = connection.alias


def _through_wrappers(run: Callable[..., Any], statement: str, params: Any) -> Any:
    """``run(statement, params, many, context)`` on a cursor of the connection, seen as a query by
    its execute wrappers (the monitoring middleware's query count and time) and by its query log
    when one is kept (DEBUG, tests); errors come as Django's."""
    started = time.perf_counter()
    with connection.cursor() as cursor, connection.wrap_database_errors:
        execute: Callable[..., Any] = run
        for wrapper in reversed(connection.execute_wrappers):
            execute = functools.partial(wrapper, execute)
        result = execute(statement, params, False, {"connection": connection, "cursor": cursor})
    if connection.queries_logged:
        connection.queries_log.append({"sql": statement, "time": f"{time.perf_counter() - started:.3f}"})
    return result


def fetch_prepared(statement: str, params: Sequence[Any] | Mapping[str, Any]) -> list[tuple[Any, ...]]:
    """The rows of ``statement`` (none for one returning none) run as a prepared statement with
    server-side parameters (PostgreSQL).

    Django binds parameters on the client and never prepares, so PostgreSQL parses and plans every
    query again; for the VM list page that planning (0.5 ms) cost more than running it (0.4 ms),
    EXPLAIN ANALYZE at 1M VMs. Here the statement is prepared once per connection (psycopg keeps it
    per parameter types) and executed with its parameters. Timestamps load through psycopg's C loader.
    Only for fixed statements whose plan does not depend on their parameters' values: PostgreSQL may
    switch a prepared statement to one generic plan after five executions. On another database (the
    SQLite file of ``make run``) the statement runs as any query.
    """
    if not on_postgresql():
        with connection.cursor() as cursor:
            cursor.execute(statement, params)
            return list(cursor.fetchall())

    def run(sql: str, params: Any, many: bool, context: dict[str, Any]) -> list[tuple[Any, ...]]:
        with psycopg.Cursor(context["cursor"].cursor.connection) as server_side:
            # psycopg's C timestamp loader (Django registers a pure-Python subclass on its
            # connections); the values are the same aware datetimes, in UTC (the session's zone).
            server_side.adapters.register_loader("timestamptz", TimestamptzLoader)
            server_side.execute(sql, params, prepare=True)
            return server_side.fetchall() if server_side.description is not None else []

    rows: list[tuple[Any, ...]] = _through_wrappers(run, statement, params)
    return rows


def columns(model: type[models.Model], alias: str) -> str:
    """``alias.column, ...`` of every concrete field of ``model`` in field order: the select list of a
    statement whose rows :func:`fetch_instances` reads."""
    quote = connection.ops.quote_name
    return ", ".join(f"{alias}.{quote(str(field.column))}" for field in model._meta.concrete_fields)


@functools.cache
def _loading(
    model: type[models.Model],
) -> tuple[list[str], tuple[tuple[int, tuple[Callable[..., Any], ...], Any], ...]]:
    """The attribute names of :func:`columns` and, per column that needs one, the converters the ORM
    applies to it (built once per model)."""
    found = []
    for position, field in enumerate(model._meta.concrete_fields):
        column = field.get_col(model._meta.db_table)
        converters = connection.ops.get_db_converters(column) + field.get_db_converters(connection)
        if converters:
            found.append((position, tuple(converters), column))
    return [field.attname for field in model._meta.concrete_fields], tuple(found)


def fetch_instances(model: type[M], statement: str, params: Sequence[Any] | Mapping[str, Any]) -> list[M]:
    """The ``model`` instances of ``statement``'s rows, run by :func:`fetch_prepared`; its select list
    must be :func:`columns` of ``model``. Values are converted as the ORM converts them (JSON
    fields). On another database than PostgreSQL the statement runs through ``raw()``."""
    if not on_postgresql():
        return list(model._default_manager.raw(statement, params))
    return [instance_from_row(model, row) for row in fetch_prepared(statement, params)]


def instance_from_row(model: type[M], row: Sequence[Any]) -> M:
    """The ``model`` instance of a row of :func:`columns` of ``model`` (a slice of a row of a join)
    as :func:`fetch_prepared` returns it, its values converted as the ORM converts them."""
    attnames, converters = _loading(model)
    values = list(row)
    for position, functions, column in converters:
        for function in functions:
            values[position] = function(values[position], column, connection)
    return model.from_db(connection.alias, attnames, values)


@functools.cache
def _select_by(model: type[models.Model], field_name: str) -> str:
    quote = connection.ops.quote_name
    field = model._meta.get_field(field_name)
    assert isinstance(field, models.Field), f"{field_name} is not a column of {model.__name__}"
    table = quote(model._meta.db_table)
    return f"SELECT {columns(model, table)} FROM {table} WHERE {quote(str(field.column))} = %s LIMIT 1"  # noqa: S608


def get_by(model: type[M], field_name: str, value: Any) -> M | None:
    """The ``model`` instance whose ``field_name`` (a unique field, or the first of several) is
    ``value``, or None: one fixed statement, built once and prepared (:func:`fetch_instances`),
    where the ORM's ``filter(...).first()`` compiles the same query on every call."""
    found = fetch_instances(model, _select_by(model, field_name), [value])
    return found[0] if found else None


def delete_before(
    model: type[models.Model], *, field_name: str, cutoff: datetime, batch: int, deadline: float
) -> int:
    """Delete the rows of ``model`` whose ``field_name`` is before ``cutoff``, ``batch`` rows per
    statement (short statements: no long row locks), until none is left or ``time.monotonic()``
    passes ``deadline``; the number deleted. A retention task calls it again on its next run."""
    deleted = 0
    while time.monotonic() < deadline:
        ids = list(
            model._default_manager.filter(**{f"{field_name}__lt": cutoff}).values_list("pk", flat=True)[
                :batch
            ]
        )
        if not ids:
            break
        count, _ = model._default_manager.filter(pk__in=ids).delete()
        deleted += count
        if len(ids) < batch:
            break
    return deleted


class AddIndexConcurrentlyWherePossible(AddIndex):
    """``CREATE INDEX CONCURRENTLY`` on PostgreSQL, so a live table keeps taking writes; plain elsewhere.

    The migration using it must set ``atomic = False``: PostgreSQL refuses CONCURRENTLY in a transaction.
    """

    def database_forwards(self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any) -> None:
        model = to_state.apps.get_model(app_label, self.model_name)
        if not self.allow_migrate_model(schema_editor.connection.alias, model):
            return
        if schema_editor.connection.vendor == "postgresql":
            schema_editor.add_index(model, self.index, concurrently=True)
        else:
            schema_editor.add_index(model, self.index)

    def database_backwards(self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any) -> None:
        model = from_state.apps.get_model(app_label, self.model_name)
        if not self.allow_migrate_model(schema_editor.connection.alias, model):
            return
        if schema_editor.connection.vendor == "postgresql":
            schema_editor.remove_index(model, self.index, concurrently=True)
        else:
            schema_editor.remove_index(model, self.index)

    def describe(self) -> str:
        return f"{super().describe()} (concurrently on PostgreSQL)"
