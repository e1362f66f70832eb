"""The pooled connections' check on real PostgreSQL connections: a healthy idle connection passes
without a round trip; one whose backend was terminated, or that is closed, does not; and a request's
connection comes from the pool healthy after its pooled backend was terminated."""

import time

import psycopg
import pytest
from django.db import connection, connections

from novacron.pgbackend.base import DatabaseWrapper, usable

pytestmark = pytest.mark.skipif(connection.vendor != "postgresql", reason="PostgreSQL's pool")


def _connect() -> psycopg.Connection:
    options = connection.settings_dict
    return psycopg.connect(
        host=options["HOST"],
        port=options["PORT"] or 5432,
        user=options["USER"],
        dbname="postgres",
        autocommit=True,
    )


def _last_query(observer: psycopg.Connection, pid: int) -> str:
    row = observer.execute("SELECT query FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone()
    assert row is not None
    return str(row[0])


def _until_refused(conn: psycopg.Connection) -> None:
    deadline = time.monotonic() + 10
    while usable(conn):  # the server's goodbye is on its way
        assert time.monotonic() < deadline, "a terminated backend passed the check for 10 s"
        time.sleep(0.05)


def test_a_healthy_idle_connection_passes_without_a_round_trip():
    with _connect() as conn, _connect() as observer:
        conn.execute("SELECT 1 AS pgbackend_marker")
        assert usable(conn) and usable(conn)
        # psycopg_pool's own check would have sent an empty query, which pg_stat_activity shows
        assert _last_query(observer, conn.info.backend_pid) == "SELECT 1 AS pgbackend_marker"


def test_a_terminated_backend_fails_and_a_closed_connection_fails():
    with _connect() as conn, _connect() as observer:
        observer.execute("SELECT pg_terminate_backend(%s)", [conn.info.backend_pid])
        _until_refused(conn)
        assert not usable(conn)
    closed = _connect()
    closed.close()
    assert not usable(closed)


@pytest.mark.django_db(transaction=True)
def test_a_request_never_gets_a_pooled_connection_whose_backend_was_terminated():
    wrapper = connections["default"]
    assert isinstance(wrapper, DatabaseWrapper) and wrapper.pool is not None
    connection.ensure_connection()
    pooled = connection.connection
    pid = pooled.info.backend_pid
    connection.close()  # back to the pool, idle
    with _connect() as observer:
        observer.execute("SELECT pg_terminate_backend(%s)", [pid])
    _until_refused(pooled)
    for _ in range(wrapper.pool.max_size):  # whichever pooled connection comes, it works
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            assert cursor.fetchone()[0] != pid
        connection.close()
