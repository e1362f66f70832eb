"""The data migration from DRF's ``authtoken``: a key made the old way still authenticates after
migrating, and the old table (keys in clear) is gone. Runs the real migrations back and forth."""

from typing import Any

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from apps.accounts.models import ApiToken
from tests.apps.accounts.conftest import bearer

# The table as DRF's authtoken migrations 0001-0004 leave it (a 40-hex-digit key, one per user).
OLD_TABLE_SQL = (
    'CREATE TABLE "authtoken_token" ("key" varchar(40) NOT NULL PRIMARY KEY, '
    '"created" timestamp with time zone NOT NULL, "user_id" integer NOT NULL UNIQUE '
    'REFERENCES "auth_user" ("id") DEFERRABLE INITIALLY DEFERRED)'
)
OLD_KEY = "9944b09199c62bcf9418ad846dd0e4bbdfc6ee4b"  # DRF's own documentation example


def _migrate(target: list[tuple[str, str]]) -> None:
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(target)


def _applied(app: str) -> list[str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT name FROM django_migrations WHERE app = %s", [app])
        return [row[0] for row in cursor.fetchall()]


@pytest.mark.django_db(transaction=True)
def test_a_token_made_by_drf_authtoken_authenticates_after_migrating(make_user: Any) -> None:
    owner = make_user("legacy")
    _migrate([("accounts", "0001_initial")])
    try:
        with connection.cursor() as cursor:
            cursor.execute(OLD_TABLE_SQL)
            cursor.execute(
                "INSERT INTO authtoken_token (key, created, user_id) VALUES (%s, '2026-01-02T03:04:05Z', %s)",
                [OLD_KEY, owner.pk],
            )
            cursor.execute(
                "INSERT INTO django_migrations (app, name, applied) VALUES ('authtoken', '0004_alter_tokenproxy_options', now())"
            )
        _migrate([("accounts", "0002_tokens_from_authtoken")])
    finally:
        with connection.cursor() as cursor:
            cursor.execute("DROP TABLE IF EXISTS authtoken_token")
    assert "authtoken_token" not in connection.introspection.table_names()
    assert _applied("authtoken") == []
    carried = ApiToken.objects.get(user=owner)
    assert (carried.name, carried.prefix, carried.read_only, carried.expires_at) == (
        "default",
        OLD_KEY[:10],
        False,
        None,
    )
    assert carried.created_at.isoformat() == "2026-01-02T03:04:05+00:00"
    me = bearer(OLD_KEY).get("/api/v1/users/me/")
    assert me.status_code == 200 and me.json()["username"] == "legacy"
    _migrate([("accounts", "0001_initial")])  # back: the tokens stay, nothing is made again
    _migrate([("accounts", "0002_tokens_from_authtoken")])
    assert ApiToken.objects.filter(user=owner).count() == 1


@pytest.mark.django_db(transaction=True)
def test_the_migration_without_the_old_table_changes_nothing(make_user: Any) -> None:
    make_user("fresh")
    _migrate([("accounts", "0001_initial")])
    _migrate([("accounts", "0002_tokens_from_authtoken")])
    assert not ApiToken.objects.exists()
