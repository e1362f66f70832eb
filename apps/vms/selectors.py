"""Reads of the fleet, always through the caller's tenancy: users see their own, staff see all
(:func:`visible_owner`, the one place that rule is written)."""

from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db import models
from django.db.models import Count, Q, QuerySet, Sum
from django.db.models.functions import Coalesce

from apps.core.context import Viewer

from . import representation
from .choices import VMState
from .models import VM, BatchOperation, Quota

AnyUser = AbstractBaseUser | AnonymousUser
M = TypeVar("M", bound=models.Model)


@dataclass(frozen=True)
class Limits:
    max_vms: int
    max_vcpus: int
    max_memory_mb: int


@dataclass(frozen=True)
class Usage:
    vms: int
    vcpus: int
    memory_mb: int


def user_quota(*, user: AnyUser) -> Limits:
    row = Quota.objects.filter(user_id=user.pk or 0).values("max_vms", "max_vcpus", "max_memory_mb").first()
    return Limits(**(row or Quota.defaults()))


def user_usage(*, user: AnyUser) -> Usage:
    totals = (
        VM.objects.filter(owner_id=user.pk)
        .exclude(state=VMState.DELETED)
        .aggregate(vms=Count("*"), vcpus=Coalesce(Sum("vcpus"), 0), memory_mb=Coalesce(Sum("memory_mb"), 0))
    )
    return Usage(**totals)


def user_profile(*, user: AnyUser, quota: Limits | None = None, usage: Usage | None = None) -> dict[str, Any]:
    """``users/me``: the user, their quota and usage (read here unless given, e.g. from the cache)."""
    return {
        "id": user.pk,
        "username": user.get_username(),
        "email": getattr(user, "email", ""),
        "is_staff": bool(getattr(user, "is_staff", False)),
        "quota": asdict(quota or user_quota(user=user)),
        "usage": asdict(usage or user_usage(user=user)),
    }


UserId = TypeVar("UserId", int, str)


def visible_owner(*, user_id: UserId, is_staff: bool) -> UserId | None:
    """Who may see a VM or a batch, the one rule every read path applies: its owner, and staff
    (everyone's). The owner a viewer's reads are limited to; None: every owner's rows.

    ``user_id`` is typed as the caller has it: an id, or its text in a cache key's layout.
    """
    return None if is_staff else user_id


def viewer_of(user: AnyUser) -> Viewer:
    """The viewer a user is for :func:`visible_owner` (anonymous: id 0, which no user has)."""
    return Viewer(user_id=user.pk or 0, is_staff=bool(getattr(user, "is_staff", False)))


def _visible(queryset: QuerySet[M], viewer: Viewer) -> QuerySet[M]:
    owner = visible_owner(user_id=viewer.user_id, is_staff=viewer.is_staff)
    return queryset if owner is None else queryset.filter(owner_id=owner)


def vm_visible_to(viewer: Viewer) -> QuerySet[VM]:
    """Every VM ``viewer`` may see, deleted ones included (for detail lookups), with what
    :mod:`.representation` reads of their relations."""
    return _visible(VM.objects.select_related(*representation.relations()), viewer)


def vm_visible(*, user: AnyUser) -> QuerySet[VM]:
    """:func:`vm_visible_to` of a user."""
    return vm_visible_to(viewer_of(user))


def vm_list(*, user: AnyUser, state: str | None = None, include_deleted: bool = False) -> QuerySet[VM]:
    """The VM list: live VMs unless ``state`` asks for another, newest first (index-backed)."""
    queryset = vm_visible(user=user)
    if state:
        return queryset.filter(state=state)
    if not include_deleted:
        queryset = queryset.filter(~Q(state=VMState.DELETED))
    return queryset


def vm_rows(queryset: QuerySet[VM]) -> QuerySet[VM, dict[str, Any]]:
    """``queryset`` read as rows of :mod:`.representation`'s ORM paths (one query, no model
    instances; dicts, which cursor pagination reads its position from): :func:`vm_row_data`."""
    return queryset.values(*dict.fromkeys(representation.orm_paths()))


def vm_row_data(row: dict[str, Any]) -> dict[str, Any]:
    """A row of :func:`vm_rows` as the API's dict."""
    return representation.row_data([row[path] for path in representation.orm_paths()])


def batch_visible(*, user: AnyUser) -> QuerySet[BatchOperation]:
    return _visible(BatchOperation.objects.all(), viewer_of(user))
