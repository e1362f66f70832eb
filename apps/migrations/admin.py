"""Django admin for migrations."""

from django.contrib import admin

from .models import Migration


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
        "created_at",
        "finished_at",
    )
    list_filter = ("status", "mode")
    search_fields = ("id", "vm__name", "vm__id")
    list_select_related = ("vm", "source_node", "dest_node")
    readonly_fields = [field.name for field in Migration._meta.fields]

    def has_add_permission(self, request: object) -> bool:
        return False
