"""Migration endpoints: list, detail with history, bandwidth changes, cancel, force-complete, the
events stream's address; and a node's drain (``POST /api/v1/nodes/{id}/drain/``: its VMs migrated
away).

``GET /api/v1/migrations/{id}/events/`` answers 307 to the same path on the streams service
(``apps.streams``), after the same checks as the detail (401, 404 for another project's migration):
a stream held here would hold a WSGI thread and a database connection.
"""

import json
from typing import Any

from django.db.models import QuerySet
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import generics, mixins, permissions, renderers, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from apps.audit.choices import AuditAction
from apps.audit.recording import AuditedView
from apps.core.auth import request_user
from apps.core.ids import uuid_text
from apps.projects.acting import viewer as acting_viewer
from apps.projects.permissions import ProjectRole
from apps.streams.links import streams_base
from apps.vms.models import Node

from . import services
from .models import Migration
from .selectors import migration_visible
from .serializers import (
    MigrationDetailSerializer,
    MigrationSerializer,
    MigrationUpdateSerializer,
    NodeDrainSerializer,
)


class EventStreamRenderer(renderers.BaseRenderer):
    media_type = "text/event-stream"
    format = "sse"
    charset = "utf-8"

    def render(
        self, data: Any, accepted_media_type: str | None = None, renderer_context: Any = None
    ) -> bytes:
        return json.dumps(data).encode()


class MigrationViewSet(
    AuditedView,
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.UpdateModelMixin,
    viewsets.GenericViewSet[Migration],
):
    """Migrations of the VMs of the project the request acts in (all for staff naming none), with
    live progress while they run. Any role reads, ``member`` and ``admin`` act."""

    filterset_fields = ("status", "mode", "vm")
    http_method_names = ("get", "patch", "post", "head", "options")
    permission_classes = (permissions.IsAuthenticated, ProjectRole)
    audit_actions = {
        "partial_update": AuditAction.MIGRATION_UPDATE,
        "cancel": AuditAction.MIGRATION_CANCEL,
        "force_complete": AuditAction.MIGRATION_FORCE_COMPLETE,
    }
    audit_fields = ("bandwidth_limit_mbps",)

    def audit_project_id(self, request: Request, response: Response | None) -> int | None:
        """The project acted in; for staff acting on the whole fleet, the migrating VM's."""
        found = super().audit_project_id(request, response)
        if found is not None or not request.user.is_staff or "pk" not in self.kwargs:
            return found
        migration_id = uuid_text(self.kwargs["pk"])
        if migration_id is None:
            return None
        return Migration.objects.filter(pk=migration_id).values_list("vm__project_id", flat=True).first()

    def get_queryset(self) -> QuerySet[Migration]:
        queryset = migration_visible(viewer=acting_viewer(self.request))
        return queryset.prefetch_related("events") if self.action == "retrieve" else queryset

    def get_serializer_class(self) -> type[serializers.BaseSerializer[Any]]:
        if self.action == "retrieve":
            return MigrationDetailSerializer
        if self.action == "partial_update":
            return MigrationUpdateSerializer
        return MigrationSerializer

    @extend_schema(request=MigrationUpdateSerializer, responses={200: MigrationSerializer})
    def partial_update(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        migration = self.get_object()
        serializer = MigrationUpdateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        migration = services.migration_set_bandwidth(
            migration=migration,
            bandwidth_limit_mbps=serializer.validated_data["bandwidth_limit_mbps"],
            actor=request_user(request).get_username(),
        )
        return Response(MigrationSerializer(migration).data)

    @extend_schema(request=None, responses={202: MigrationSerializer})
    @action(detail=True, methods=["post"])
    def cancel(self, request: Request, pk: str) -> Response:
        migration = services.migration_cancel(
            migration=self.get_object(), actor=request_user(request).get_username()
        )
        return Response(MigrationSerializer(migration).data, status=202)

    @extend_schema(request=None, responses={202: MigrationSerializer})
    @action(detail=True, methods=["post"], url_path="force-complete")
    def force_complete(self, request: Request, pk: str) -> Response:
        migration = services.migration_force_complete(
            migration=self.get_object(), actor=request_user(request).get_username()
        )
        return Response(MigrationSerializer(migration).data, status=202)

    @extend_schema(
        responses={
            307: OpenApiResponse(
                description="Redirect to the streams service, which serves the events (progress, end) "
                "as Server-Sent Events: docs/streams.md"
            )
        }
    )
    @action(detail=True, methods=["get"], renderer_classes=[renderers.JSONRenderer, EventStreamRenderer])
    def events(self, request: Request, pk: str) -> Response:
        migration = self.get_object()
        query = request._request.META.get("QUERY_STRING", "")
        url = f"{streams_base(request._request)}/api/v1/migrations/{migration.pk}/events/"
        url += f"?{query}" if query else ""
        return Response(
            {"detail": "Migration events are served by the streams service.", "url": url},
            status=status.HTTP_307_TEMPORARY_REDIRECT,
            headers={"Location": url},
        )


class NodeDrainView(AuditedView, generics.GenericAPIView[Node]):
    """Move every VM off this node within the migration limits; it goes to maintenance once empty."""

    audit_actions = {"post": AuditAction.NODE_DRAIN}

    permission_classes = (permissions.IsAdminUser,)
    queryset = Node.objects.all()
    serializer_class = NodeDrainSerializer

    @extend_schema(request=None, responses={202: NodeDrainSerializer}, operation_id="nodes_drain_create")
    def post(self, request: Request, pk: str) -> Response:
        result = services.node_drain(node=self.get_object(), requested_by=request_user(request))
        return Response(result, status=status.HTTP_202_ACCEPTED)
