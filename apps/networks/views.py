"""Network endpoints. Thin: validate, call one service, serialize.

Tenancy as for VMs: a request acts in a project (``X-Project`` or ``project``, else the caller's
personal project) and sees its networks and the shared ones; staff naming no project see all.
Another project's private network is 404. Any role reads; ``member`` and ``admin`` create, change
and delete their project's networks; shared and provider networks are made and changed by staff.
"""

from typing import Any

from django.db.models import QuerySet
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, permissions, serializers, status, viewsets
from rest_framework.exceptions import PermissionDenied
from rest_framework.request import Request
from rest_framework.response import Response

from apps.audit.recording import AuditedView, model_writes
from apps.projects.acting import acting, write_project
from apps.projects.acting import viewer as acting_viewer
from apps.projects.permissions import ProjectRole

from . import services
from .models import Network
from .selectors import network_visible_to
from .serializers import NetworkCreateSerializer, NetworkSerializer, NetworkUpdateSerializer

STAFF_FIELDS = ("shared", "physical_network")


class NetworkViewSet(
    AuditedView,
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    viewsets.GenericViewSet[Network],
):
    """Networks of the project the request acts in, and the shared ones. Members create networks
    (an IPv4 CIDR from /16 to /29, an optional gateway and DNS servers) within the project's quota;
    staff create shared and provider networks. A network in use by a VM cannot be deleted (409)."""

    audit_actions = model_writes("network")
    audit_fields = ("name", "cidr", "gateway", "mtu", "external", "shared", "physical_network")

    serializer_class = NetworkSerializer
    permission_classes = (permissions.IsAuthenticated, ProjectRole)
    http_method_names = ("get", "post", "patch", "delete", "head", "options")
    filterset_fields = ("name", "shared", "external")

    def get_queryset(self) -> QuerySet[Network]:
        return network_visible_to(acting_viewer(self.request))

    def get_serializer_class(self) -> type[serializers.BaseSerializer[Any]]:
        """The input shapes for the browsable API's forms; answers are always NetworkSerializer's."""
        inputs: dict[str, type[serializers.BaseSerializer[Any]]] = {
            "create": NetworkCreateSerializer,
            "partial_update": NetworkUpdateSerializer,
        }
        return inputs.get(self.action, NetworkSerializer)

    def _writable(self, request: Request) -> Network:
        """The network of the URL, if the caller may change it: staff, or the acting project's own
        private network (shared ones are staff's; another project's is not even seen: 404)."""
        network = self.get_object()
        if request.user.is_staff:
            return network
        if network.shared or network.project_id != acting(request).project_id:
            raise PermissionDenied("Only staff change shared networks.")
        return network

    @extend_schema(request=NetworkCreateSerializer, responses={201: NetworkSerializer})
    def create(self, request: Request) -> Response:
        serializer = NetworkCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data: dict[str, Any] = dict(serializer.validated_data)
        if not request.user.is_staff and any(data.get(field) for field in STAFF_FIELDS):
            raise PermissionDenied("Only staff create shared or provider networks.")
        network = services.network_create(project_id=write_project(request), **data)
        return Response(NetworkSerializer(network).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=NetworkUpdateSerializer, responses={200: NetworkSerializer})
    def partial_update(self, request: Request, pk: str) -> Response:
        """Rename a network or change its DNS servers (its addresses stay)."""
        network = self._writable(request)
        serializer = NetworkUpdateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        network = services.network_update(network=network, **serializer.validated_data)
        return Response(NetworkSerializer(network).data)

    @extend_schema(request=None, responses={204: None})
    def destroy(self, request: Request, pk: str) -> Response:
        services.network_delete(network=self._writable(request))
        return Response(status=status.HTTP_204_NO_CONTENT)
