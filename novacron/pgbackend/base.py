"""Django's PostgreSQL backend, whose pooled connections are checked before a request gets one
without a round trip for the healthy ones.

A connection the server has ended (``pg_terminate_backend``, a restart or failover) must not be
handed to a request. Django's check for pools (``CONN_HEALTH_CHECKS``: psycopg_pool's own) sends a
query on every checkout, one round trip per request that uses the database, before its first query.
An idle pooled connection has nothing to read: its results were consumed before it went back to the
pool. The server writes to it unasked only to end it (an error message, then the end of the stream)
or with a notice. So a socket with nothing to read is taken as it is; a readable one gets
psycopg_pool's check, and a connection that fails it is closed, given back (the pool discards it and
opens another) and the next one is taken.
"""

import select
from typing import Any

import psycopg
from django.db.backends.postgresql import base
from psycopg_pool import ConnectionPool


def usable(conn: psycopg.Connection[Any]) -> bool:
    """Whether the idle pooled ``conn`` can serve a request."""
    if conn.closed or conn.broken:
        return False
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    if not poller.poll(0):
        return True
    try:
        ConnectionPool.check_connection(conn)
    except psycopg.Error:
        return False
    return True


class DatabaseWrapper(base.DatabaseWrapper):
    def get_new_connection(self, conn_params: dict[str, Any]) -> Any:
        pool = self.pool
        if pool is None:
            return super().get_new_connection(conn_params)
        for _ in range(pool.max_size):  # every pooled connection dead (a restart): all replaced
            conn = super().get_new_connection(conn_params)
            if usable(conn):
                return conn
            conn.close()
            pool.putconn(conn)
        return super().get_new_connection(conn_params)
