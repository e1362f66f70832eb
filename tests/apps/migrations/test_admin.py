"""The admin's migration page: its bar carries what admin-progress.js needs to follow the stream."""

import pytest

from apps.migrations.models import Migration
from apps.vms.models import VM

pytestmark = pytest.mark.django_db


def test_the_migration_page_follows_its_stream(client, staff, make_node, make_image, settings):
    settings.STREAMS_URL = "https://streams.example.org"
    source, dest = make_node("adm-a"), make_node("adm-b")
    vm = VM.objects.create(
        owner=staff,
        name="adm",
        image=make_image(),
        node=source,
        state="running",
        vcpus=1,
        memory_mb=256,
        disk_gb=1,
    )
    migration = Migration.objects.create(vm=vm, source_node=source, dest_node=dest, status="transferring")
    client.force_login(staff)
    page = client.get(f"/admin/vm_migrations/migration/{migration.pk}/change/").content.decode()
    assert f'data-migration="{migration.pk}"' in page and 'data-status="transferring"' in page
    assert 'data-streams-url="https://streams.example.org"' in page
    assert "migrations/follow.js" in page and "migrations/admin-progress.js" in page
    assert 'class="stream-note" hidden' in page  # the fallback's note, shown by the script when needed
