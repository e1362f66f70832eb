"""The project role a request needs: any role reads, ``member`` and ``admin`` act; staff do all."""

from typing import Any

from rest_framework.permissions import SAFE_METHODS, BasePermission

from .acting import acting
from .models import Role, role_allows


class ProjectRole(BasePermission):
    """Reads need a role in the acting project, writes ``view.project_role`` (default ``member``).

    An unknown project, or one the caller is not a member of, is a 404 (:mod:`.acting`).
    """

    message = "Your role in this project does not allow this."

    def has_permission(self, request: Any, view: Any) -> bool:
        user = request.user
        if not (user and user.is_authenticated):
            return False
        where = acting(request)
        if user.is_staff:
            return True
        needed = Role.READER if request.method in SAFE_METHODS else getattr(view, "project_role", Role.MEMBER)
        if role_allows(where.role, needed):
            return True
        self.message = f"Your role in this project is {where.role}: it needs {needed.value} or above."
        return False
