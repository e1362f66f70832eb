"""Shapes of API logs, metric series queries and answers, alert rules and alerts."""

from datetime import timedelta
from typing import Any

from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from apps.core.serializers import NameOrIdField, StrictInputMixin
from apps.vms.models import VM, Node

from .conf import monitoring_setting
from .models import Alert, AlertRule, APILog

MAX_SERIES_RANGE = timedelta(days=90)
DEFAULT_SERIES_RANGE = timedelta(hours=1)
_STEP_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class APILogSerializer(serializers.ModelSerializer[APILog]):
    user = serializers.CharField(source="user.username", read_only=True, allow_null=True, default=None)

    class Meta:
        model = APILog
        fields = (
            "id",
            "timestamp",
            "user",
            "method",
            "endpoint",
            "status",
            "duration_ms",
            "response_bytes",
            "request_id",
        )
        read_only_fields = fields


@extend_schema_field(OpenApiTypes.STR)
class StepField(serializers.Field):
    """A bucket width: seconds (``60``) or a number with a unit (``30s``, ``5m``, ``1h``, ``1d``)."""

    default_error_messages = {"invalid": "Give seconds (60) or a duration like 30s, 5m, 1h, 1d."}

    def to_internal_value(self, data: Any) -> int:
        text = str(data).strip().lower()
        unit = _STEP_UNITS.get(text[-1:])
        number = text[:-1] if unit else text
        if not number.isdigit() or len(number) > 9:
            self.fail("invalid")
        seconds = int(number) * (unit or 1)
        if seconds < 1:
            self.fail("invalid")
        return seconds

    def to_representation(self, value: int) -> int:
        return value


class SeriesQuerySerializer(StrictInputMixin, serializers.Serializer[dict[str, Any]]):
    """``?name=&node=&vm=&since=&until=&step=``: one metric, a time range and a bucket width."""

    name = serializers.CharField(max_length=100)
    node = NameOrIdField(Node, required=False)
    vm = serializers.PrimaryKeyRelatedField(queryset=VM.objects.all(), required=False)
    since = serializers.DateTimeField(required=False)
    until = serializers.DateTimeField(required=False)
    step = StepField(required=False)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        until = attrs.get("until") or timezone.now()
        since = attrs.get("since") or until - DEFAULT_SERIES_RANGE
        if since >= until:
            raise serializers.ValidationError({"since": ["Must be before until."]})
        if until - since > MAX_SERIES_RANGE:
            raise serializers.ValidationError(
                {"since": [f"The range may span at most {MAX_SERIES_RANGE.days} days."]}
            )
        span = (until - since).total_seconds()
        max_points = monitoring_setting("SERIES_MAX_POINTS")
        step = attrs.get("step") or max(1, int(-(-span // max_points)))
        if span / step > max_points:
            raise serializers.ValidationError(
                {"step": [f"{int(span // step)} buckets asked; at most {max_points}: use a larger step."]}
            )
        return attrs | {"since": since, "until": until, "step": step}


class SeriesPointSerializer(serializers.Serializer[Any]):
    t = serializers.DateTimeField(source="start")
    count = serializers.IntegerField(source="aggregate.count")
    avg = serializers.FloatField(source="aggregate.avg")
    max = serializers.FloatField(source="aggregate.max")
    p95 = serializers.FloatField(source="aggregate.p95")


class AlertRuleSerializer(StrictInputMixin, serializers.ModelSerializer[AlertRule]):
    class Meta:
        model = AlertRule
        fields = (
            "id",
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
        extra_kwargs = {
            "window_seconds": {"min_value": 10, "max_value": 86400},
            "for_seconds": {"min_value": 0, "max_value": 7 * 86400},
        }

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        window = attrs.get("window_seconds", getattr(self.instance, "window_seconds", 300))
        for_seconds = attrs.get("for_seconds", getattr(self.instance, "for_seconds", 300))
        if for_seconds and for_seconds / window > monitoring_setting("SERIES_MAX_POINTS"):
            raise serializers.ValidationError({"for_seconds": ["Too many windows: raise window_seconds."]})
        return attrs


class AlertSerializer(serializers.ModelSerializer[Alert]):
    rule = serializers.CharField(source="rule.name", read_only=True)
    metric = serializers.CharField(source="rule.metric", read_only=True)
    acknowledged_by = serializers.CharField(
        source="acknowledged_by.username", read_only=True, allow_null=True, default=None
    )

    class Meta:
        model = Alert
        fields = (
            "id",
            "rule",
            "metric",
            "subject",
            "status",
            "severity",
            "value",
            "message",
            "started_at",
            "acknowledged_at",
            "acknowledged_by",
            "resolved_at",
        )
        read_only_fields = fields
