"""Database: PostgreSQL through psycopg 3 and its connection pool; SQLite as the embedded default."""

from typing import Any

import dj_database_url

from .django import VAR_DIR
from .env import env, env_int

DATABASE_URL = env(
    "DATABASE_URL",
    f"sqlite:///{VAR_DIR / 'novacron.sqlite3'}",
    help="Database URL, e.g. postgres://user:pass@host:5432/novacron; default a SQLite file under var/.",
)

_database: dict[str, Any] = dict(dj_database_url.parse(DATABASE_URL))
if _database["ENGINE"] == "django.db.backends.postgresql":
    # Django's own psycopg pool: persistent connections must stay off (CONN_MAX_AGE=0) with it.
    _database["CONN_MAX_AGE"] = 0
    _database.setdefault("OPTIONS", {})["pool"] = {
        # Sized for the web server of the Procfile (4 workers x 2 blocking threads): every thread finds
        # an open connection; the control worker's 4 threads grow their pool to 4 (max: room to spare).
        "min_size": env_int("DB_POOL_MIN", 2, help="PostgreSQL pool: connections kept open per process."),
        "max_size": env_int("DB_POOL_MAX", 8, help="PostgreSQL pool: most connections per process."),
        "max_lifetime": env_int(
            "DB_POOL_MAX_LIFETIME", 1800, help="PostgreSQL pool: seconds before recycling."
        ),
        "max_idle": env_int(
            "DB_POOL_MAX_IDLE", 300, help="PostgreSQL pool: seconds an idle connection is kept."
        ),
        "timeout": env_int("DB_POOL_TIMEOUT", 10, help="PostgreSQL pool: seconds to wait for a connection."),
    }
    # psycopg prepares nothing with Django's default of None, not even what asks for it. Django's own
    # cursors bind on the client and never prepare whatever this says; the fixed statements run by
    # apps.core.db.fetch_prepared ask to be prepared at once, so the count here is never reached.
    _database["OPTIONS"]["prepare_threshold"] = 1_000_000
    # Every checkout is checked, without a round trip for a healthy connection (novacron.pgbackend):
    # a backend killed by pg_terminate_backend is replaced, not handed to a request. Django's own
    # check (CONN_HEALTH_CHECKS with a pool: a round trip on every checkout) stays off.
    _database["ENGINE"] = "novacron.pgbackend"
    _database["CONN_HEALTH_CHECKS"] = False
else:
    _database.setdefault("OPTIONS", {}).update({"timeout": 20, "transaction_mode": "IMMEDIATE"})
    VAR_DIR.mkdir(parents=True, exist_ok=True)

DATABASES = {"default": _database}
