"""Django admin for the audit trail: a read-only changelist (events are never added or changed by hand)."""

from typing import Any

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest

from apps.projects.models import Project

from .models import AuditEvent


class ProjectListFilter(admin.SimpleListFilter):
    """By project id, offering today's team projects: a DISTINCT over the events would scan the
    table, and personal projects are one per user (too many to list; ``?project=<id>`` takes any)."""

    title = "project"
    parameter_name = "project"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        teams = Project.objects.filter(personal_of__isnull=True).order_by("name")
        return [(str(pk), name) for pk, name in teams.values_list("pk", "name")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[AuditEvent]) -> QuerySet[AuditEvent]:
        value = self.value()
        return queryset.filter(project_id=int(value)) if value and value.isdigit() else queryset


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin[AuditEvent]):
    list_display = (
        "timestamp",
        "actor_name",
        "project_name",
        "action",
        "target_type",
        "target_id",
        "status",
        "outcome",
        "request_id",
    )
    list_filter = ("action", "outcome", ProjectListFilter)
    search_fields = ("=actor_name", "=target_id")
    search_help_text = "An actor's username or a target's id, exactly."
    show_full_result_count = False

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: AuditEvent | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: AuditEvent | None = None) -> bool:
        return False
