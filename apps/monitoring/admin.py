"""Django admin for alert rules (editable), alerts (acknowledge action) and API logs."""

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from apps.core.auth import request_user

from . import services
from .choices import AlertStatus
from .models import Alert, AlertRule, APILog


@admin.register(AlertRule)
class AlertRuleAdmin(admin.ModelAdmin[AlertRule]):
    list_display = (
        "name",
        "metric",
        "aggregation",
        "comparison",
        "threshold",
        "window_seconds",
        "for_seconds",
        "severity",
        "scope",
        "enabled",
    )
    list_filter = ("severity", "scope", "enabled")


@admin.register(Alert)
class AlertAdmin(admin.ModelAdmin[Alert]):
    list_display = (
        "rule",
        "subject",
        "status",
        "severity",
        "value",
        "started_at",
        "acknowledged_at",
        "resolved_at",
    )
    list_filter = ("status", "severity")
    list_select_related = ("rule",)
    actions = ("acknowledge",)

    @admin.action(description="Acknowledge the selected firing alerts")
    def acknowledge(self, request: HttpRequest, queryset: QuerySet[Alert]) -> None:
        firing = list(queryset.filter(status=AlertStatus.FIRING))
        for alert in firing:
            services.alert_acknowledge(alert=alert, user=request_user(request))
        self.message_user(request, f"{len(firing)} alert(s) acknowledged.", messages.SUCCESS)


@admin.register(APILog)
class APILogAdmin(admin.ModelAdmin[APILog]):
    list_display = ("timestamp", "user", "method", "endpoint", "status", "duration_ms")
    list_filter = ("method", "status")
    show_full_result_count = False
