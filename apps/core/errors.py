"""The domain exception hierarchy and the single DRF exception handler.

Every error leaves the API as ``{"error": {"code", "message", "fields"?}}`` with a fitting status.
Services raise :class:`NovaCronError` subclasses; DRF and Django exceptions are translated here.
"""

from typing import Any

from django.core.exceptions import PermissionDenied, RequestDataTooBig
from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import Http404
from rest_framework import exceptions as drf
from rest_framework import status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler


class NovaCronError(Exception):
    """A failure the client can act on: a stable ``code``, an HTTP ``status`` and a message."""

    code: str = "error"
    status: int = status.HTTP_400_BAD_REQUEST

    def __init__(self, message: str, *, fields: dict[str, list[str]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fields = fields


class InvalidInput(NovaCronError):
    code = "invalid"
    status = status.HTTP_400_BAD_REQUEST


class NotFound(NovaCronError):
    code = "not_found"
    status = status.HTTP_404_NOT_FOUND


class QuotaExceeded(NovaCronError):
    code = "quota_exceeded"
    status = status.HTTP_403_FORBIDDEN


class InvalidState(NovaCronError):
    code = "invalid_state"
    status = status.HTTP_409_CONFLICT


class NoCapacity(NovaCronError):
    code = "no_capacity"
    status = status.HTTP_409_CONFLICT


class NoAddress(NovaCronError):
    code = "no_address"
    status = status.HTTP_409_CONFLICT


class Conflict(NovaCronError):
    code = "conflict"
    status = status.HTTP_409_CONFLICT


class TooManyItems(NovaCronError):
    code = "too_many_items"
    status = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE


def error_body(code: str, message: str, fields: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code, "message": message}
    if fields:
        body["fields"] = fields
    return {"error": body}


def _flatten(detail: Any, prefix: str = "") -> dict[str, list[str]]:
    """Turn DRF's nested error detail into ``{"vms[3].vcpus": ["..."]}``."""
    out: dict[str, list[str]] = {}
    if isinstance(detail, dict):
        for key, value in detail.items():
            if isinstance(key, int):  # a list serializer's errors, keyed by item index
                out.update(_flatten(value, f"{prefix}[{key}]"))
                continue
            name = "non_field_errors" if key in ("non_field_errors", "__all__") and not prefix else str(key)
            path = f"{prefix}.{name}" if prefix else name
            out.update(_flatten(value, path))
    elif isinstance(detail, list):
        if all(not isinstance(item, (dict, list)) for item in detail):
            out[prefix or "non_field_errors"] = [str(item) for item in detail]
        else:
            for index, item in enumerate(detail):
                if item:
                    out.update(_flatten(item, f"{prefix}[{index}]"))
    else:
        out[prefix or "non_field_errors"] = [str(detail)]
    return out


def _summary(fields: dict[str, list[str]]) -> str:
    first_field, messages = next(iter(fields.items()))
    more = len(fields) - 1
    suffix = f" (and {more} more field{'s' if more > 1 else ''})" if more else ""
    return f"{first_field}: {messages[0]}{suffix}"


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """DRF's ``EXCEPTION_HANDLER``: every failure in one shape."""
    if isinstance(exc, NovaCronError):
        return Response(error_body(exc.code, exc.message, exc.fields), status=exc.status)
    if isinstance(exc, DjangoValidationError):
        exc = drf.ValidationError(exc.message_dict if hasattr(exc, "error_dict") else exc.messages)
    if isinstance(exc, RequestDataTooBig):
        return Response(
            error_body("request_too_large", "The request body is larger than the server accepts."),
            status=status.HTTP_413_REQUEST_ENTITY_TOO_LARGE,
        )
    if isinstance(exc, Http404):
        exc = drf.NotFound()
    elif isinstance(exc, PermissionDenied):
        exc = drf.PermissionDenied()
    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    if isinstance(exc, drf.ValidationError):
        fields = _flatten(exc.detail)
        response.data = error_body("invalid", _summary(fields), fields)
    elif isinstance(exc, drf.APIException):
        detail = exc.detail
        message = (
            str(detail)
            if not isinstance(detail, (dict, list))
            else str(next(iter(_flatten(detail).values()))[0])
        )
        code = exc.get_codes() if isinstance(exc.get_codes(), str) else exc.default_code
        response.data = error_body(str(code), message)
    return response
