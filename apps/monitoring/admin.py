"""Django admin for alert rules, alerts and API logs."""

from django.contrib import admin

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


@admin.register(APILog)
class APILogAdmin(admin.ModelAdmin[APILog]):
    list_display = ("timestamp", "user", "method", "endpoint", "status", "duration_ms")
    list_filter = ("method", "status")
    show_full_result_count = False
