"""Django admin for migrations: progress bars, the audit trail, those waiting for an operator, cancel.

A migration's page follows its progress live from the streams service (``migrations/follow.js``;
polling the REST API, with a note, when the stream cannot be opened).
"""

from django.conf import settings
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.html import format_html

from apps.core.auth import request_user
from apps.core.errors import NovaCronError

from . import services
from .models import Migration, MigrationEvent
from .serializers import MigrationSerializer


class MigrationEventInline(admin.TabularInline[MigrationEvent, Migration]):
    model = MigrationEvent
    fields = ("at", "actor", "from_status", "to_status", "phase", "detail")
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: Migration | None = None) -> bool:
        return False


@admin.register(Migration)
class MigrationAdmin(admin.ModelAdmin[Migration]):
    list_display = (
        "id",
        "vm",
        "source_node",
        "dest_node",
        "mode",
        "status",
        "phase",
        "progress",
        "needs_operator",
        "created_at",
    )
    list_filter = ("needs_operator", "status", "mode")
    search_fields = ("id", "vm__name", "vm__id")
    list_select_related = ("vm", "source_node", "dest_node")
    readonly_fields = [*(field.name for field in Migration._meta.fields), "live_progress"]
    inlines = (MigrationEventInline,)
    actions = ("cancel_migrations",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # migrations are requested from a VM (API or the VM admin's action)

    @admin.display(description="Progress")
    def progress(self, migration: Migration) -> str:
        percent = MigrationSerializer(migration).data["percent"]
        return format_html(
            '<progress max="100" value="{}" style="width:8em"></progress> {}%', percent, round(percent)
        )

    @admin.display(description="Progress")
    def live_progress(self, migration: Migration) -> str:
        """The bar of the migration's page, which ``admin-progress.js`` moves with its stream."""
        percent = MigrationSerializer(migration).data["percent"]
        return format_html(
            '<progress max="100" value="{}" style="width:12em" data-migration="{}" data-status="{}" '
            'data-streams-url="{}" data-streams-port="{}"></progress> <span>{}%</span>'
            ' <span class="stream-note" hidden></span>',
            percent,
            migration.pk,
            migration.status,
            settings.STREAMS_URL,
            settings.STREAMS_PORT,
            round(percent),
        )

    class Media:
        js = ("migrations/follow.js", "migrations/admin-progress.js")

    @admin.action(description="Cancel selected migrations")
    def cancel_migrations(self, request: HttpRequest, queryset: QuerySet[Migration]) -> None:
        actor = request_user(request).get_username()
        for migration in queryset:
            try:
                services.migration_cancel(migration=migration, actor=actor)
            except NovaCronError as exc:
                self.message_user(request, f"{migration.pk}: {exc.message}", messages.ERROR)
