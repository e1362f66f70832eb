"""Project, member and quota endpoints. Thin: find the project as the caller sees it, check the role
the action needs, call one service, serialize.

The project is the one in the path (``X-Project`` plays no part here). Any role reads a project,
its members and its quota; ``admin`` changes the project and its members; only staff write quotas;
a member may leave on their own. A project the caller is not a member of answers 404 as an unknown
one (staff see and manage every project). A role too low answers 403. Every write, allowed or
refused, is in the audit trail (``apps.audit``), in the project of the path.
"""

from typing import Any

from django.db.models import QuerySet
from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import mixins, permissions, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import PermissionDenied
from rest_framework.request import Request
from rest_framework.response import Response

from apps.audit.choices import AuditAction
from apps.audit.recording import AuditedView, answer_of
from apps.core.auth import request_user
from apps.core.errors import InvalidInput

from . import services
from .models import Membership, Project, Role, role_allows
from .selectors import (
    membership_of,
    project_for,
    project_members,
    project_quota_report,
    project_visible_to,
    user_by_name_or_id,
)
from .serializers import (
    MembershipCreateSerializer,
    MembershipSerializer,
    MembershipUpdateSerializer,
    ProjectCreateSerializer,
    ProjectQuotaLimitsSerializer,
    ProjectQuotaSerializer,
    ProjectSerializer,
    ProjectUpdateSerializer,
    errors,
)
from .services import QUOTA_LIMIT_MAX

STAFF_ONLY = None  # the role "needed" by what only staff may do


def _require(request: Request, project: Project, needed: Role | None) -> None:
    """Refuse (403) a caller whose role in ``project`` is below ``needed`` (None: staff only)."""
    if request_user(request).is_staff:
        return
    role = getattr(project, "role", None)
    if needed is not None and role_allows(role, needed):
        return
    wanted = "staff" if needed is None else f"the {needed.value} role or above"
    raise PermissionDenied(f"Your role in this project is {role}: this needs {wanted}.")


def _shown(request: Request, project: Project) -> dict[str, Any]:
    """The project as the caller sees it (re-read: its role annotation)."""
    return dict(ProjectSerializer(project_for(request_user(request), project.pk)).data)


@extend_schema_view(
    list=extend_schema(responses={200: ProjectSerializer(many=True), **errors()}),
    retrieve=extend_schema(responses={200: ProjectSerializer, **errors(404)}),
)
class ProjectViewSet(
    AuditedView, mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet[Project]
):
    """Projects: a user's are those they are a member of (with their role), staff see all. Any
    authenticated user creates team projects (and is their admin); a project's admin renames,
    describes or deletes it; staff set its quota."""

    serializer_class = ProjectSerializer
    queryset = Project.objects.none()  # the schema's model; requests read get_queryset's
    permission_classes = (permissions.IsAuthenticated,)
    lookup_value_regex = "[0-9]+"
    audit_actions = {
        "create": AuditAction.PROJECT_CREATE,
        "partial_update": AuditAction.PROJECT_UPDATE,
        "destroy": AuditAction.PROJECT_DELETE,
        "quota": {"put": AuditAction.QUOTA_UPDATE, "patch": AuditAction.QUOTA_UPDATE},
    }
    audit_fields = ("name", *QUOTA_LIMIT_MAX)
    audit_project_kwarg = "pk"  # a create's: the project it made

    def get_queryset(self) -> QuerySet[Project]:
        return project_visible_to(request_user(self.request))

    def get_object(self) -> Project:
        return project_for(request_user(self.request), self.kwargs["pk"])

    def get_serializer_class(self) -> type[serializers.BaseSerializer[Any]]:
        classes: dict[str, type[serializers.BaseSerializer[Any]]] = {
            "create": ProjectCreateSerializer,
            "partial_update": ProjectUpdateSerializer,
            "quota": ProjectQuotaLimitsSerializer,
        }
        return classes.get(self.action, ProjectSerializer)

    @extend_schema(request=ProjectCreateSerializer, responses={201: ProjectSerializer, **errors(400)})
    def create(self, request: Request) -> Response:
        """A team project with the default quota; the caller becomes its admin."""
        serializer = ProjectCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        project = services.project_create(creator=request_user(request), **serializer.validated_data)
        return Response(_shown(request, project), status=status.HTTP_201_CREATED)

    @extend_schema(
        request=ProjectUpdateSerializer, responses={200: ProjectSerializer, **errors(400, 403, 404)}
    )
    def partial_update(self, request: Request, pk: str) -> Response:
        """Change the description, or a team project's name (admin)."""
        project = self.get_object()
        _require(request, project, Role.ADMIN)
        serializer = ProjectUpdateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        project = services.project_update(project=project, **serializer.validated_data)
        return Response(_shown(request, project))

    @extend_schema(request=None, responses={204: None, **errors(403, 404, 409)})
    def destroy(self, request: Request, pk: str) -> Response:
        """Delete a team project without VMs (admin); 409 while it has some that are not deleted."""
        project = self.get_object()
        _require(request, project, Role.ADMIN)
        services.project_delete(project=project)
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(methods=["GET"], request=None, responses={200: ProjectQuotaSerializer, **errors(404)})
    @extend_schema(
        methods=["PUT", "PATCH"],
        request=ProjectQuotaLimitsSerializer,
        responses={200: ProjectQuotaSerializer, **errors(400, 403, 404)},
    )
    @action(detail=True, methods=["get", "put", "patch"])
    def quota(self, request: Request, pk: str) -> Response:
        """The project's limits and usage (any role); staff set the limits (PUT: all, PATCH: some).
        A limit may be set below the usage: the project's next creates are then refused."""
        project = self.get_object()
        if request.method != "GET":
            _require(request, project, STAFF_ONLY)
            serializer = ProjectQuotaLimitsSerializer(data=request.data, partial=request.method == "PATCH")
            serializer.is_valid(raise_exception=True)
            if not serializer.validated_data:
                raise InvalidInput("Give at least one of max_vms, max_vcpus, max_memory_mb, max_networks.")
            project = services.project_set_quota(project=project, limits=serializer.validated_data)
        return Response(project_quota_report(project=project))


@extend_schema_view(list=extend_schema(responses={200: MembershipSerializer(many=True), **errors(404)}))
class ProjectMemberViewSet(AuditedView, mixins.ListModelMixin, viewsets.GenericViewSet[Membership]):
    """Members of a project: any member lists them; its admins (and staff) add members, change
    their roles and remove them; a member may leave. A project keeps at least one admin, and a
    personal project its owner."""

    serializer_class = MembershipSerializer
    queryset = Membership.objects.none()  # the schema's model; requests read get_queryset's
    permission_classes = (permissions.IsAuthenticated,)
    lookup_field = "user_id"
    lookup_value_regex = "[0-9]+"
    audit_actions = {
        "create": AuditAction.MEMBER_ADD,
        "partial_update": AuditAction.MEMBER_UPDATE,
        "destroy": AuditAction.MEMBER_REMOVE,
    }
    audit_fields = ("user", "role")
    audit_project_kwarg = "id"

    def audit_target_id(self, request: Request, response: Response | None, action: AuditAction) -> str:
        """The member's user id: the path's, or an added member's from the answer."""
        named = super().audit_target_id(request, response, action)
        return named or str(answer_of(response).get("user_id", ""))

    def _project(self) -> Project:
        return project_for(request_user(self.request), self.kwargs["id"])

    def get_queryset(self) -> QuerySet[Membership]:
        return project_members(project=self._project())

    def get_serializer_class(self) -> type[serializers.BaseSerializer[Any]]:
        classes: dict[str, type[serializers.BaseSerializer[Any]]] = {
            "create": MembershipCreateSerializer,
            "partial_update": MembershipUpdateSerializer,
        }
        return classes.get(self.action, MembershipSerializer)

    @extend_schema(
        request=MembershipCreateSerializer,
        responses={201: MembershipSerializer, **errors(400, 403, 404, 409)},
    )
    def create(self, request: Request, id: str) -> Response:
        """Add a user (by username or id) in a role, ``member`` unless given (admin)."""
        project = self._project()
        _require(request, project, Role.ADMIN)
        serializer = MembershipCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        user = user_by_name_or_id(serializer.validated_data["user"])
        if user is None:
            message = f"No active user {serializer.validated_data['user']!r}."
            raise InvalidInput(message, fields={"user": [message]})
        membership = services.membership_add(
            project=project, user=user, role=serializer.validated_data["role"]
        )
        return Response(MembershipSerializer(membership).data, status=status.HTTP_201_CREATED)

    @extend_schema(
        request=MembershipUpdateSerializer,
        responses={200: MembershipSerializer, **errors(400, 403, 404, 409)},
    )
    def partial_update(self, request: Request, id: str, user_id: str) -> Response:
        """Change a member's role (admin); the last admin is not demoted (409)."""
        project = self._project()
        _require(request, project, Role.ADMIN)
        membership = membership_of(project=project, user_id=user_id)
        serializer = MembershipUpdateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        membership = services.membership_change_role(
            membership=membership, role=serializer.validated_data["role"]
        )
        return Response(MembershipSerializer(membership).data)

    @extend_schema(request=None, responses={204: None, **errors(403, 404, 409)})
    def destroy(self, request: Request, id: str, user_id: str) -> Response:
        """Remove a member (admin), or leave (any member); never the last admin (409)."""
        project = self._project()
        if str(request_user(request).pk) != user_id:
            _require(request, project, Role.ADMIN)
        services.membership_remove(membership=membership_of(project=project, user_id=user_id))
        return Response(status=status.HTTP_204_NO_CONTENT)
