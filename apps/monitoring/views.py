"""Monitoring endpoints: API logs, metric series, alert rules and alerts. Thin: validate, read, serialize."""

from typing import Any

from django.db.models import QuerySet
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import mixins, permissions, serializers, viewsets
from rest_framework.decorators import action
from rest_framework.pagination import CursorPagination
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from apps.audit.choices import AuditAction
from apps.audit.recording import AuditedView, model_writes
from apps.core.auth import request_user
from apps.core.errors import NotFound
from apps.core.pagination import TimestampCursorPagination
from apps.projects.acting import viewer as acting_viewer
from apps.vms.selectors import vm_visible_to

from . import services
from .filters import AlertFilter, APILogFilter
from .models import Alert, AlertRule, APILog
from .selectors import metric_series
from .serializers import (
    AlertRuleSerializer,
    AlertSerializer,
    APILogSerializer,
    SeriesPointSerializer,
    SeriesQuerySerializer,
)


class NameCursorPagination(CursorPagination):
    ordering = ("name", "id")
    page_size = 100
    page_size_query_param = "page_size"
    max_page_size = 500


class StartedCursorPagination(CursorPagination):
    ordering = ("-started_at", "-id")
    page_size = 100
    page_size_query_param = "page_size"
    max_page_size = 500


class APILogViewSet(mixins.ListModelMixin, viewsets.GenericViewSet[APILog]):
    """Logged API requests, newest first (staff only)."""

    serializer_class = APILogSerializer
    permission_classes = (permissions.IsAdminUser,)
    pagination_class = TimestampCursorPagination
    filterset_class = APILogFilter
    queryset = APILog.objects.select_related("user")


class MetricSeriesView(APIView):
    """A metric downsampled to one avg/max/p95 per step. Staff see everything; others their VMs."""

    @extend_schema(
        parameters=[SeriesQuerySerializer],
        responses=inline_serializer(
            "MetricSeries",
            fields={
                "name": serializers.CharField(),
                "node": serializers.CharField(allow_null=True),
                "vm": serializers.UUIDField(allow_null=True),
                "since": serializers.DateTimeField(),
                "until": serializers.DateTimeField(),
                "step": serializers.IntegerField(),
                "points": SeriesPointSerializer(many=True),
            },
        ),
    )
    def get(self, request: Request) -> Response:
        # ``format`` belongs to DRF's content negotiation (?format=json), not to the query.
        params = {key: value for key, value in request.query_params.items() if key != "format"}
        query = SeriesQuerySerializer(data=params)
        query.is_valid(raise_exception=True)
        params = query.validated_data
        user = request_user(request)
        vm = params.get("vm")
        if not user.is_staff and (
            vm is None or not vm_visible_to(acting_viewer(request)).filter(pk=vm.pk).exists()
        ):
            raise NotFound(
                "Only staff may read fleet metrics; others may give the id of a VM of their project."
            )
        points = metric_series(
            name=params["name"],
            since=params["since"],
            until=params["until"],
            step_seconds=params["step"],
            node=params.get("node"),
            vm=vm,
        )
        node = params.get("node")
        return Response(
            {
                "name": params["name"],
                "node": node.name if node else None,
                "vm": str(vm.pk) if vm else None,
                "since": params["since"],
                "until": params["until"],
                "step": params["step"],
                "points": SeriesPointSerializer(points, many=True).data,
            }
        )


class AlertRuleViewSet(AuditedView, viewsets.ModelViewSet[AlertRule]):
    """Alert rules (staff only); the default ones are loaded by a data migration."""

    audit_actions = model_writes("alert_rule")
    audit_fields = AlertRuleSerializer.Meta.fields

    serializer_class = AlertRuleSerializer
    permission_classes = (permissions.IsAdminUser,)
    pagination_class = NameCursorPagination
    queryset = AlertRule.objects.all()
    filterset_fields = ("enabled", "severity", "scope", "metric")


class AlertViewSet(
    AuditedView, mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet[Alert]
):
    """Alerts, newest first (staff only): ``?status=firing&severity=critical``."""

    audit_actions = {"acknowledge": AuditAction.ALERT_ACKNOWLEDGE}

    serializer_class = AlertSerializer
    permission_classes = (permissions.IsAdminUser,)
    pagination_class = StartedCursorPagination
    filterset_class = AlertFilter

    def get_queryset(self) -> QuerySet[Alert]:
        return Alert.objects.select_related("rule", "acknowledged_by")

    @extend_schema(request=None, responses={200: AlertSerializer})
    @action(detail=True, methods=["post"])
    def acknowledge(self, request: Request, pk: Any = None) -> Response:
        alert = services.alert_acknowledge(alert=self.get_object(), user=request_user(request))
        alert = self.get_queryset().get(pk=alert.pk)
        return Response(AlertSerializer(alert).data)
