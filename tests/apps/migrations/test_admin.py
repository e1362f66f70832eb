"""The admin's migration page: its bar carries what admin-progress.js needs to follow the stream."""

import pytest

pytestmark = pytest.mark.django_db


def test_the_migration_page_follows_its_stream(client, staff, make_migration, settings):
    settings.STREAMS_URL = "https://streams.example.org"
    migration = make_migration(staff)
    client.force_login(staff)
    page = client.get(f"/admin/vm_migrations/migration/{migration.pk}/change/").content.decode()
    assert f'data-migration="{migration.pk}"' in page and 'data-status="transferring"' in page
    assert 'data-streams-url="https://streams.example.org"' in page
    assert "migrations/follow.js" in page and "migrations/admin-progress.js" in page
    assert 'class="stream-note" hidden' in page  # the fallback's note, shown by the script when needed
