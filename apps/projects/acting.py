"""Where a request acts: the project it names (header ``X-Project`` or query ``project``, an id or a
name), else the caller's personal project; and the caller's role there.

The one visibility rule of the fleet's tenant resources follows from it (:func:`viewer`): reads are
of the acting project; staff naming no project read the whole fleet. A project the caller is not
a member of answers 404 as an unknown one does (staff may name any project; DRF's ``NotFound``, which
the browsable API's form checks expect of a permission check). Resolved once per
request and kept in its context (:func:`apps.core.context.request_context`), where the VM read fast
path also puts what it read from the token's memo.
"""

from typing import Any, Final

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.http import HttpRequest
from rest_framework.exceptions import NotFound
from rest_framework.request import Request

from apps.core.context import Acting, Caller, Viewer, request_context

from .models import Membership, Project, Role
from .services import personal_project

PROJECT_HEADER: Final = "X-Project"
PROJECT_META: Final = "HTTP_X_PROJECT"
PROJECT_PARAM: Final = "project"

AnyUser = AbstractBaseUser | AnonymousUser


def requested_project(request: HttpRequest | Request) -> str | None:
    """The project a request names (the header first), or None."""
    django_request: Any = getattr(request, "_request", request)
    named = django_request.META.get(PROJECT_META) or django_request.GET.get(PROJECT_PARAM)
    return named.strip() or None if named else None


def caller(request: HttpRequest | Request, user: Any) -> Caller:
    """The caller of ``request`` and their projects: as token authentication read them, else read
    once here (a session's user)."""
    context = request_context(request)
    if context.caller is None or context.caller.user_id != user.pk:
        context.caller = caller_of(user)
    return context.caller


def caller_of(user: AbstractBaseUser) -> Caller:
    """``user`` as a :class:`Caller`: their personal project (made on first use) and roles."""
    personal = personal_project(user).pk
    roles = tuple(sorted(Membership.objects.filter(user_id=user.pk).values_list("project_id", "role")))
    return Caller(user.pk, bool(getattr(user, "is_staff", False)), personal, roles)


def _named(request: HttpRequest | Request, user: Any, named: str) -> Acting:
    """The named project (an id or a name) and the caller's role there; 404 when it is unknown or
    the caller, not staff, is no member."""
    known = caller(request, user)
    project_id: int | None = int(named) if named.isdigit() else None
    if project_id is None:
        project_id = Project.objects.filter(name=named).values_list("pk", flat=True).first()
    role = None if project_id is None else known.role(project_id)
    if role is not None:
        return Acting(project_id, role)
    if user.is_staff and project_id is not None and Project.objects.filter(pk=project_id).exists():
        return Acting(project_id, None)
    raise NotFound(f"No project {named!r} that you are a member of.")


def acting(request: HttpRequest | Request, user: AnyUser | None = None) -> Acting:
    """Where ``request`` acts (resolved on first use; ``user``: the caller, else the request's)."""
    context = request_context(request)
    if context.acting is not None:
        return context.acting
    who: Any = user if user is not None else request.user
    named = requested_project(request)
    if not who.is_authenticated:
        found = Acting(None, None)
    elif named is not None:
        found = _named(request, who, named)
    elif who.is_staff:
        found = Acting(None, None)
    else:
        found = Acting(caller(request, who).personal_project, Role.ADMIN)
    context.acting = found
    return found


def viewer(request: HttpRequest | Request) -> Viewer:
    """The caller as the read paths see them (their reads are of :func:`acting`'s project)."""
    user: Any = request.user
    return Viewer(user_id=user.pk or 0, is_staff=bool(user.is_staff), project_id=acting(request).project_id)


def write_project(request: HttpRequest | Request) -> int:
    """The project a new resource of this request belongs to: the acting one; a staff caller naming
    none creates in their personal project."""
    project_id = acting(request).project_id
    return caller(request, request.user).personal_project if project_id is None else project_id
