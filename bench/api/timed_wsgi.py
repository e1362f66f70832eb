"""The production WSGI application with every database query timed, for ``make bench-api`` only.

PostgreSQL's ``pg_stat_statements`` needs ``shared_preload_libraries`` (a server restart) on a
server other people use, so the benchmark times queries where Django runs them instead: each
query's wall time (driver round trip included) is appended, with its end time, to a per-process
file of float64 pairs under ``NOVACRON_BENCH_QUERY_DIR``; the benchmark reads the pairs that fall
inside a scenario's time window. Cost per query: two clock reads and an array append.
"""

import array
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from django.db import connection

from novacron.wsgi import application as django_application

_DIRECTORY = os.environ["NOVACRON_BENCH_QUERY_DIR"]
_lock = threading.Lock()
_pending = array.array("d")
FLUSH_EVERY_SECONDS = 0.5


def _record(execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any) -> Any:
    started = time.perf_counter()
    try:
        return execute(sql, params, many, context)
    finally:
        ended = time.perf_counter()
        with _lock:
            _pending.append(time.time())
            _pending.append(ended - started)


def _flush_forever() -> None:
    path = os.path.join(_DIRECTORY, f"queries-{os.getpid()}.f64")
    while True:
        time.sleep(FLUSH_EVERY_SECONDS)
        with _lock:
            chunk = _pending.tobytes()
            del _pending[:]
        if chunk:
            with open(path, "ab") as out:
                out.write(chunk)


threading.Thread(target=_flush_forever, name="bench-query-flush", daemon=True).start()


def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    with connection.execute_wrapper(_record):
        return django_application(environ, start_response)
