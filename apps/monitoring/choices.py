"""Choices of alert rules and alerts."""

from django.db import models


class Aggregation(models.TextChoices):
    AVG = "avg", "Average"
    P95 = "p95", "95th percentile"
    MAX = "max", "Maximum"


class Comparison(models.TextChoices):
    GT = "gt", ">"
    GTE = "gte", ">="
    LT = "lt", "<"
    LTE = "lte", "<="


class Severity(models.TextChoices):
    INFO = "info", "Info"
    WARNING = "warning", "Warning"
    CRITICAL = "critical", "Critical"


class Scope(models.TextChoices):
    GLOBAL = "global", "Control plane"
    NODE = "node", "Each node"
    VM = "vm", "Each VM"


class AlertStatus(models.TextChoices):
    FIRING = "firing", "Firing"
    ACKNOWLEDGED = "acknowledged", "Acknowledged"
    RESOLVED = "resolved", "Resolved"
