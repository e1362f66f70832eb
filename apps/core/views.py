"""Health probes and the token endpoint."""

import logging

import redis
from django.conf import settings
from django.db import connection
from django.http import HttpRequest, JsonResponse
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.authtoken.models import Token
from rest_framework.authtoken.serializers import AuthTokenSerializer
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.throttling import AnonRateThrottle

from apps.audit.choices import AuditAction
from apps.audit.recording import AuditedView

logger = logging.getLogger(__name__)


def healthz(request: HttpRequest) -> JsonResponse:
    """The process is up and serving."""
    return JsonResponse({"status": "ok"})


def readyz(request: HttpRequest) -> JsonResponse:
    """The database and Redis answer; 503 naming what does not."""
    checks: dict[str, str] = {}
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        checks["database"] = "ok"
    except Exception as exc:  # any driver error means "not ready"
        logger.warning("readiness: database unreachable: %s", exc)
        checks["database"] = f"unreachable: {type(exc).__name__}"
    try:
        client = redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=1, socket_timeout=1)
        client.ping()
        checks["redis"] = "ok"
    except redis.RedisError as exc:
        logger.warning("readiness: redis unreachable: %s", exc)
        checks["redis"] = f"unreachable: {type(exc).__name__}"
    ready = all(value == "ok" for value in checks.values())
    return JsonResponse(
        {"status": "ok" if ready else "unavailable", "checks": checks}, status=200 if ready else 503
    )


class TokenThrottle(AnonRateThrottle):
    """Login attempts per client address, whoever they claim to be."""

    scope = "token"


class TokenView(AuditedView):
    """Exchange a username and password for an API token."""

    audit_actions = {"post": AuditAction.TOKEN_CREATE}
    audit_fields = ("username",)  # never the password; the token is only in the answer

    permission_classes = (AllowAny,)
    authentication_classes = ()
    throttle_classes = (TokenThrottle,)

    @extend_schema(
        request=AuthTokenSerializer,
        responses=inline_serializer("TokenResponse", fields={"token": serializers.CharField()}),
    )
    def post(self, request: Request) -> Response:
        serializer = AuthTokenSerializer(data=request.data, context={"request": request})
        serializer.is_valid(raise_exception=True)
        token, _ = Token.objects.get_or_create(user=serializer.validated_data["user"])
        return Response({"token": token.key})
