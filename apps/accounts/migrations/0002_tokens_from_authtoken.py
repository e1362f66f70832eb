"""Carry DRF's ``authtoken`` tokens over: each ``authtoken_token`` row becomes an ApiToken named
"default" whose secret is the old key (stored as its digest), so existing clients keep working.

The old table is read with raw SQL when it exists (``rest_framework.authtoken`` has left
INSTALLED_APPS, so its models are gone) and then dropped, with ``authtoken``'s rows in
``django_migrations``: it held every key in clear, and an app installed again later starts afresh.
Its content type and permissions stay until ``manage.py remove_stale_contenttypes``. Going back
keeps the ApiTokens and does not make the old table again (its keys are no longer known).
"""

import hashlib
from datetime import UTC, datetime
from typing import Any

from django.db import migrations

OLD_TABLE = "authtoken_token"
PREFIX_LENGTH = 10  # ApiToken's, as it was when this migration was written


def _aware(value: datetime | str) -> datetime:
    """A creation time as read by the raw cursor (SQLite gives text, in UTC) as an aware datetime."""
    found = datetime.fromisoformat(value) if isinstance(value, str) else value
    return found if found.tzinfo else found.replace(tzinfo=UTC)


def carry_over(apps: Any, schema_editor: Any) -> None:
    connection = schema_editor.connection
    if OLD_TABLE not in connection.introspection.table_names():
        return
    quote = connection.ops.quote_name
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {quote('key')}, user_id, created FROM {quote(OLD_TABLE)}")  # noqa: S608
        rows = cursor.fetchall()
    api_token = apps.get_model("accounts", "ApiToken")
    api_token.objects.bulk_create(
        [
            api_token(
                user_id=user_id,
                name="default",
                digest=hashlib.sha256(key.encode()).hexdigest(),
                prefix=key[:PREFIX_LENGTH],
                created_at=_aware(created),
            )
            for key, user_id, created in rows
        ],
        ignore_conflicts=True,  # run again (after going back): the tokens carried over already
    )
    schema_editor.execute(f"DROP TABLE {quote(OLD_TABLE)}")
    schema_editor.execute("DELETE FROM django_migrations WHERE app = %s", ["authtoken"])


class Migration(migrations.Migration):
    dependencies = [("accounts", "0001_initial")]

    operations = [migrations.RunPython(carry_over, migrations.RunPython.noop, elidable=True)]
