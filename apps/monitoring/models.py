"""API request logs, metric samples, alert rules and the alerts they raise."""

from django.conf import settings
from django.db import models
from django.db.models import Q

from apps.vms.models import VM, Node

from .choices import Aggregation, AlertStatus, Comparison, Scope, Severity


class APILog(models.Model):
    timestamp = models.DateTimeField()
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, db_index=False
    )
    method = models.CharField(max_length=8)
    endpoint = models.CharField(max_length=255, help_text="The route pattern, not the raw path with ids.")
    status = models.PositiveSmallIntegerField()
    duration_ms = models.FloatField()
    response_bytes = models.PositiveIntegerField(default=0)
    request_id = models.CharField(max_length=64, blank=True)

    class Meta:
        db_table = "api_logs"
        verbose_name = "API log"
        indexes = [
            models.Index(fields=["-timestamp"], name="api_logs_timestamp_idx"),
            models.Index(fields=["user", "endpoint"], name="api_logs_user_endpoint_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.method} {self.endpoint} {self.status}"


class Metric(models.Model):
    timestamp = models.DateTimeField()
    node = models.ForeignKey(Node, on_delete=models.SET_NULL, null=True, blank=True, db_index=False)
    vm = models.ForeignKey(VM, on_delete=models.SET_NULL, null=True, blank=True, db_index=False)
    name = models.CharField(max_length=100)
    value = models.FloatField()

    class Meta:
        db_table = "metrics"
        indexes = [
            models.Index(fields=["-timestamp"], name="metrics_timestamp_idx"),
            # Series, alert windows and the dashboard read one metric over a time range.
            models.Index(fields=["name", "timestamp"], name="metrics_name_timestamp_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.name}={self.value}"


class AlertRule(models.Model):
    name = models.CharField(max_length=100, unique=True)
    metric = models.CharField(max_length=100)
    aggregation = models.CharField(max_length=8, choices=Aggregation.choices, default=Aggregation.AVG)
    comparison = models.CharField(max_length=4, choices=Comparison.choices, default=Comparison.GT)
    threshold = models.FloatField()
    window_seconds = models.PositiveIntegerField(default=300)
    for_seconds = models.PositiveIntegerField(default=300)
    severity = models.CharField(max_length=10, choices=Severity.choices, default=Severity.WARNING)
    scope = models.CharField(max_length=8, choices=Scope.choices, default=Scope.GLOBAL)
    enabled = models.BooleanField(default=True)

    class Meta:
        db_table = "alert_rules"
        ordering = ("name",)

    def __str__(self) -> str:
        return self.name


class Alert(models.Model):
    rule = models.ForeignKey(AlertRule, on_delete=models.CASCADE, related_name="alerts")
    subject = models.CharField(max_length=100, blank=True, help_text="Node or VM the alert is about, if any.")
    status = models.CharField(max_length=14, choices=AlertStatus.choices, default=AlertStatus.FIRING)
    severity = models.CharField(max_length=10, choices=Severity.choices)
    value = models.FloatField()
    message = models.CharField(max_length=500)
    started_at = models.DateTimeField()
    acknowledged_at = models.DateTimeField(null=True, blank=True)
    acknowledged_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    resolved_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "alerts"
        ordering = ("-started_at",)
        indexes = [models.Index(fields=["status", "severity"], name="alerts_status_severity_idx")]
        constraints = [
            models.UniqueConstraint(
                fields=("rule", "subject"),
                condition=~Q(status=AlertStatus.RESOLVED),
                name="one_open_alert_per_subject",
            )
        ]

    def __str__(self) -> str:
        return f"{self.rule} {self.subject} {self.status}"
