"""Token and user endpoints: ``auth/token/`` (a password for a token), the caller's ``tokens/`` and
the staff's ``users/``. Thin: validate, call one service, serialize.

A token is its owner's alone: another user's answers 404, staff included (they deactivate a user
instead). Users are managed by staff only (403 otherwise); ``users/me/`` is ``apps.vms.views.MeView``.
"""

from typing import Any

from django.contrib.auth.models import User
from django.db.models import QuerySet
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, permissions, status, viewsets
from rest_framework.decorators import action
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.serializers import BaseSerializer
from rest_framework.throttling import AnonRateThrottle

from apps.audit.choices import AuditAction
from apps.audit.recording import AuditedView
from apps.core.auth import request_user
from apps.core.pagination import CreatedCursorPagination

from . import selectors, services
from .models import ApiToken
from .serializers import (
    IssuedTokenSerializer,
    LoginSerializer,
    PasswordResetSerializer,
    TokenCreateSerializer,
    TokenSerializer,
    UserCreateSerializer,
    UserSerializer,
    UserUpdateSerializer,
)


def _issued(issued: services.IssuedToken, status_code: int) -> Response:
    data = IssuedTokenSerializer(issued.token, context={"secret": issued.secret}).data
    return Response(data, status=status_code)


class TokenThrottle(AnonRateThrottle):
    """Login attempts per client address, whoever they claim to be."""

    scope = "token"


class TokenView(AuditedView):
    """Exchange a username and password for a new API token (its secret shown this once)."""

    audit_actions = {"post": AuditAction.TOKEN_CREATE}
    audit_fields = ("username", "name", "read_only")  # never the password; the secret is only answered

    permission_classes = (AllowAny,)
    authentication_classes = ()
    throttle_classes = (TokenThrottle,)

    @extend_schema(request=LoginSerializer, responses=IssuedTokenSerializer)
    def post(self, request: Request) -> Response:
        serializer = LoginSerializer(data=request.data, context={"request": request})
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        issued = services.token_create(
            user=data["user"],
            name=data.get("name"),
            expires_at=data.get("expires_at"),
            read_only=data["read_only"],
        )
        return _issued(issued, status.HTTP_200_OK)


class TokenViewSet(
    AuditedView, mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet[ApiToken]
):
    """The caller's API tokens: list, make (the secret shown once), read, revoke (DELETE)."""

    audit_actions = {"create": AuditAction.TOKEN_CREATE, "destroy": AuditAction.TOKEN_REVOKE}
    audit_fields = ("name", "read_only")

    serializer_class = TokenSerializer
    pagination_class = CreatedCursorPagination
    lookup_value_regex = "[0-9]+"

    def get_queryset(self) -> QuerySet[ApiToken]:
        return selectors.tokens_of(user=self.request.user)

    def get_serializer_class(self) -> type[BaseSerializer[Any]]:
        return TokenCreateSerializer if self.action == "create" else TokenSerializer  # the browsable form's

    @extend_schema(request=TokenCreateSerializer, responses={201: IssuedTokenSerializer})
    def create(self, request: Request) -> Response:
        serializer = TokenCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        issued = services.token_create(user=request_user(request), **serializer.validated_data)
        return _issued(issued, status.HTTP_201_CREATED)

    @extend_schema(responses={204: None})
    def destroy(self, request: Request, pk: str) -> Response:
        services.token_revoke(token=self.get_object())
        return Response(status=status.HTTP_204_NO_CONTENT)


class IsStaff(permissions.IsAdminUser):
    message = "Only staff may manage users."


class UserPagination(CreatedCursorPagination):
    ordering = ("username",)


class UserViewSet(
    AuditedView, mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet[User]
):
    """Users, for staff: list, create, read, change (``is_active``, ``is_staff``, ``email``) and
    reset a password. Users are deactivated, not deleted (their VMs and history stay theirs)."""

    audit_actions = {
        "create": AuditAction.USER_CREATE,
        "partial_update": AuditAction.USER_UPDATE,
        "password": AuditAction.USER_PASSWORD,
    }
    audit_fields = ("username", "is_staff", "is_active", "revoke_tokens")  # never a password

    serializer_class = UserSerializer
    permission_classes = (IsStaff,)
    pagination_class = UserPagination
    filterset_fields = ("is_active", "is_staff")
    lookup_value_regex = "[0-9]+"  # users/me/ is MeView's
    http_method_names = ("get", "post", "patch", "head", "options")

    def get_queryset(self) -> QuerySet[User]:
        return selectors.users()

    def get_serializer_class(self) -> type[BaseSerializer[Any]]:
        by_action: dict[str, type[BaseSerializer[Any]]] = {
            "create": UserCreateSerializer,
            "partial_update": UserUpdateSerializer,
        }
        return by_action.get(self.action, UserSerializer)

    @extend_schema(request=UserCreateSerializer, responses={201: UserSerializer})
    def create(self, request: Request) -> Response:
        serializer = UserCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        user = services.user_create(**serializer.validated_data)
        return Response(UserSerializer(user).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=UserUpdateSerializer, responses=UserSerializer)
    def partial_update(self, request: Request, pk: str) -> Response:
        user = self.get_object()
        serializer = UserUpdateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        services.user_update(user=user, actor=request_user(request), **serializer.validated_data)
        return Response(UserSerializer(user).data)

    @extend_schema(request=PasswordResetSerializer, responses={204: None})
    @action(detail=True, methods=["post"])
    def password(self, request: Request, pk: str) -> Response:
        """Set the user's password; with ``revoke_tokens``, also revoke every token of theirs."""
        user = self.get_object()
        serializer = PasswordResetSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        services.user_set_password(user=user, **serializer.validated_data)
        return Response(status=status.HTTP_204_NO_CONTENT)
