"""Where a request acts: the project it names (header ``X-Project`` or query ``project``, an id or a
name), else the caller's personal project; and the caller's role there.

The one visibility rule of the fleet's tenant resources follows from it (:func:`viewer`): reads are
of the acting project; staff naming no project read the whole fleet. A project the caller is not
a member of answers 404 as an unknown one does (staff may name any project). Resolved once per
request and kept in its context (:func:`apps.core.context.request_context`), where the VM read fast
path also puts what it read from the token's memo.
"""

from typing import Any, Final

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.http import HttpRequest
from rest_framework.request import Request

from apps.core.context import Acting, Caller, Viewer, request_context
from apps.core.errors import NotFound

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


def _named(user: Any, named: str) -> Acting:
    """The named project (an id or a name) and the caller's role there; 404 when it is unknown or
    the caller, not staff, is no member."""
    by = {"pk": int(named)} if named.isdigit() else {"name": named}
    if user.is_staff:
        project_id = Project.objects.filter(**by).values_list("pk", flat=True).first()
        if project_id is not None:
            role = Membership.objects.filter(project_id=project_id, user_id=user.pk).values_list(
                "role", flat=True
            )
            return Acting(project_id, role.first())
    else:
        prefixed = {f"project__{key}": value for key, value in by.items()}
        found = (
            Membership.objects.filter(user_id=user.pk, **prefixed).values_list("project_id", "role").first()
        )
        if found is not None:
            return Acting(*found)
    raise NotFound(f"No project {named!r} that you are a member of.")


def acting(request: HttpRequest | Request, user: AnyUser | None = None) -> Acting:
    """Where ``request`` acts (resolved on first use; ``user``: the caller, else the request's)."""
    context = request_context(request)
    if context.acting is not None:
        return context.acting
    caller: Any = user if user is not None else request.user
    named = requested_project(request)
    if not caller.is_authenticated:
        found = Acting(None, None)
    elif named is not None:
        found = _named(caller, named)
    elif caller.is_staff:
        found = Acting(None, None)
    else:
        found = Acting(personal_project(caller).pk, Role.ADMIN)
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
    return personal_project(request.user).pk if project_id is None else project_id  # type: ignore[arg-type]


def caller_of(user: AbstractBaseUser) -> Caller:
    """What a token's memo holds of ``user``: their personal project (made on first use) and roles."""
    personal = personal_project(user).pk
    roles = dict(Membership.objects.filter(user_id=user.pk).values_list("project_id", "role"))
    return Caller(user.pk, bool(getattr(user, "is_staff", False)), personal, roles)
