"""Reads of projects and memberships, always through the caller: a user sees the projects they are a
member of, with their role there; staff see every project (with their role, or None).

A project the caller may not see is answered as an unknown one (:func:`project_for` raises
``NotFound``), so the API never confirms that another team's project exists.
"""

from dataclasses import asdict
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.db.models import OuterRef, QuerySet, Subquery

from apps.core.errors import NotFound
from apps.vms.selectors import project_quota, project_usage

from .models import Membership, Project


def project_visible_to(user: AbstractBaseUser) -> QuerySet[Project]:
    """The projects ``user`` sees, each annotated with ``role``: the user's role there (None: staff
    who are no member)."""
    role = Membership.objects.filter(project_id=OuterRef("pk"), user_id=user.pk).values("role")[:1]
    projects = Project.objects.annotate(role=Subquery(role))
    if getattr(user, "is_staff", False):
        return projects
    return projects.filter(memberships__user_id=user.pk)


def project_for(user: AbstractBaseUser, project_id: Any) -> Project:
    """The project ``project_id`` annotated with ``user``'s ``role``; 404 when it is unknown or not
    visible to them (a non-member, not staff)."""
    text = str(project_id)
    found = project_visible_to(user).filter(pk=int(text)).first() if text.isdigit() else None
    if found is None:
        raise NotFound("No such project.")
    return found


def project_members(*, project: Project) -> QuerySet[Membership]:
    """The project's memberships with their users (for the list of members)."""
    return Membership.objects.filter(project=project).select_related("user")


def membership_of(*, project: Project, user_id: Any) -> Membership:
    """``user_id``'s membership of ``project``; 404 when they are no member."""
    text = str(user_id)
    found = project_members(project=project).filter(user_id=int(text)).first() if text.isdigit() else None
    if found is None:
        raise NotFound("That user is not a member of this project.")
    return found


def user_by_name_or_id(value: str | int) -> AbstractBaseUser | None:
    """The active user named ``value`` (a username, or an id given as digits), or None."""
    users = get_user_model().objects.filter(is_active=True)
    text = str(value)
    if text.isdigit():
        by_id = users.filter(pk=int(text)).first()
        if by_id is not None:
            return by_id
    return users.filter(**{get_user_model().USERNAME_FIELD: text}).first()


def project_quota_report(*, project: Project) -> dict[str, dict[str, int]]:
    """The project's limits and what its live VMs and its networks use of them (``quota`` endpoint)."""
    return {
        "limits": {**asdict(project_quota(project_id=project.pk)), "max_networks": project.max_networks},
        "usage": {**asdict(project_usage(project_id=project.pk)), "networks": project.networks.count()},
    }
