"""Who opens a stream and what they may see, decided once when it opens, as the REST API decides.

The ASGI scope (HTTP or WebSocket: headers, cookies, query string) becomes a Django request that the
REST API's own authentication classes read (``Authorization: Token ...`` or the session cookie), and
the project it acts in is resolved by ``apps.projects.acting`` (``X-Project`` or ``?project=``).
Invariant: the database is touched only inside :func:`opened` (one synchronous call in Django's
thread), whose connection goes back to the pool before it returns: an open stream holds none.
"""

import io
from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from typing import Any, TypeVar

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth import get_user
from django.contrib.sessions.backends.base import SessionBase
from django.core.handlers.asgi import ASGIRequest
from django.db import close_old_connections, connections
from django.utils.functional import SimpleLazyObject
from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication
from rest_framework.request import Request
from rest_framework.settings import api_settings

T = TypeVar("T")


class Refused(Exception):
    """The stream is refused: ``status`` and a message for the client."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass(frozen=True)
class Opened:
    """Who opened the stream and what ``read`` returned for them."""

    user_id: int
    data: Any  # what the stream's opener read (e.g. the migration's state)


def _session(request: ASGIRequest) -> SessionBase:
    engine = import_module(settings.SESSION_ENGINE)
    store: SessionBase = engine.SessionStore(request.COOKIES.get(settings.SESSION_COOKIE_NAME))
    return store


def _request(scope: dict[str, Any]) -> Request:
    """The scope as the REST API's request: its authenticators, the session user behind them."""
    django_request = ASGIRequest({**scope, "method": scope.get("method", "GET")}, io.BytesIO())
    django_request.session = _session(django_request)
    django_request.user = SimpleLazyObject(lambda: get_user(django_request))  # type: ignore[assignment]
    authenticators: list[type[BaseAuthentication]] = list(api_settings.DEFAULT_AUTHENTICATION_CLASSES)  # type: ignore[arg-type]
    return Request(django_request, authenticators=[auth() for auth in authenticators])


def _returning_connection(read: Callable[..., T], *args: Any) -> T:
    close_old_connections()
    try:
        return read(*args)
    finally:
        connections.close_all()  # back to the pool: the stream waits without a connection


async def briefly(read: Callable[..., T], *args: Any) -> T:
    """``read(*args)`` in Django's thread, its database connection back in the pool before this
    returns (how an open stream or console reads: it never holds one while it waits)."""
    return await sync_to_async(_returning_connection)(read, *args)


def _open(scope: dict[str, Any], read: Callable[[Request], Any]) -> Opened:
    request = _request(scope)
    try:
        user = request.user
    except exceptions.APIException as exc:
        raise Refused(exc.status_code, str(exc.detail)) from None
    if not user.is_authenticated:
        raise Refused(401, "Authentication credentials were not provided.")
    try:
        return Opened(user_id=int(user.pk), data=read(request))
    except exceptions.APIException as exc:  # a project the caller is no member of: 404
        raise Refused(exc.status_code, str(exc.detail)) from None


async def opened(scope: dict[str, Any], read: Callable[[Request], Any]) -> Opened:
    """Authenticate the scope's caller and run ``read`` (which applies the tenancy, e.g. through
    ``apps.projects.acting.viewer`` of the request) in Django's thread; :class:`Refused` with
    401/403/404 as the REST API answers."""
    return await briefly(_open, scope, read)
