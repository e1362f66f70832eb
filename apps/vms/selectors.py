"""Reads of the fleet, always through the caller's tenancy: a viewer sees the VMs and batches of the
project they act in, staff naming no project see all (:func:`visible_project`, the one place that
rule is applied; where a request acts: :mod:`apps.projects.acting`)."""

from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db import models
from django.db.models import Count, Q, QuerySet, Sum
from django.db.models.functions import Coalesce

from apps.core.context import Viewer
from apps.core.ids import uuid_text
from apps.projects.models import Membership, Project

from . import representation
from .choices import VMState
from .models import VM, BatchOperation

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


def project_quota(*, project_id: int) -> Limits:
    limits = ("max_vms", "max_vcpus", "max_memory_mb")
    row = Project.objects.filter(pk=project_id).values(*limits).first() or Project.default_quota()
    return Limits(**{limit: row[limit] for limit in limits})


def project_usage(*, project_id: int) -> Usage:
    totals = (
        VM.objects.filter(project_id=project_id)
        .exclude(state=VMState.DELETED)
        .aggregate(vms=Count("*"), vcpus=Coalesce(Sum("vcpus"), 0), memory_mb=Coalesce(Sum("memory_mb"), 0))
    )
    return Usage(**totals)


def user_profile(*, user: AnyUser, project_id: int, usage: Usage | None = None) -> dict[str, Any]:
    """``users/me``: the user, the project they act in, its quota and usage (read here unless given,
    e.g. from the cache), and their projects with their roles."""
    limits = ("max_vms", "max_vcpus", "max_memory_mb")
    row = Project.objects.filter(pk=project_id).values("id", "name", *limits).get()
    memberships = Membership.objects.filter(user_id=user.pk or 0).order_by("project__name")
    return {
        "id": user.pk,
        "username": user.get_username(),
        "email": getattr(user, "email", ""),
        "is_staff": bool(getattr(user, "is_staff", False)),
        "project": {"id": row["id"], "name": row["name"]},
        "projects": [
            {"id": pid, "name": name, "role": role}
            for pid, name, role in memberships.values_list("project_id", "project__name", "role")
        ],
        "quota": {limit: row[limit] for limit in limits},
        "usage": asdict(usage or project_usage(project_id=project_id)),
    }


def visible_project(viewer: Viewer) -> int | None:
    """Whose VMs and batches a viewer sees, the one rule every read path applies: the project's they
    act in; None (staff naming no project): every project's."""
    return viewer.project_id


def _visible(queryset: QuerySet[M], viewer: Viewer) -> QuerySet[M]:
    project = visible_project(viewer)
    return queryset if project is None else queryset.filter(project_id=project)


def vm_visible_to(viewer: Viewer) -> QuerySet[VM]:
    """Every VM ``viewer`` may see, deleted ones included (for detail lookups), with what
    :mod:`.representation` reads of their relations (their NICs: ``NICS_PREFETCH`` where many are
    shown as instances)."""
    return _visible(VM.objects.select_related(*representation.relations()), viewer)


def vm_list(*, viewer: Viewer, state: str | None = None, include_deleted: bool = False) -> QuerySet[VM]:
    """The VM list: live VMs unless ``state`` asks for another, newest first (index-backed)."""
    queryset = vm_visible_to(viewer)
    if state:
        return queryset.filter(state=state)
    if not include_deleted:
        queryset = queryset.filter(~Q(state=VMState.DELETED))
    return queryset


def vm_rows(queryset: QuerySet[VM]) -> QuerySet[VM, dict[str, Any]]:
    """``queryset`` read as rows of :mod:`.representation`'s ORM paths (one query, no model
    instances; dicts, which cursor pagination reads its position from): :func:`vm_row_data`."""
    return (
        queryset.prefetch_related(None)
        .annotate(**representation.annotations())
        .values(*dict.fromkeys(representation.orm_paths()))
    )


def vm_row_data(row: dict[str, Any]) -> dict[str, Any]:
    """A row of :func:`vm_rows` as the API's dict."""
    return representation.row_data([row[path] for path in representation.orm_paths()])


def batch_visible(*, viewer: Viewer) -> QuerySet[BatchOperation]:
    return _visible(BatchOperation.objects.all(), viewer)


def vm_by_reference(reference: str) -> VM:
    """The live VM named ``reference`` (or with that uuid), for operators' commands; ``LookupError``
    saying why when there is none or several (those listed with their projects)."""
    live = VM.objects.exclude(state=VMState.DELETED).select_related("project")
    if uuid_text(reference) is not None:
        found = live.filter(pk=reference).first()
        if found is None:
            raise LookupError(f"no VM with id {reference}")
        return found
    matches = list(live.filter(name=reference)[:10])
    if not matches:
        raise LookupError(f"no VM named {reference!r}")
    if len(matches) > 1:
        listed = ", ".join(f"{vm.pk} (project {vm.project.name})" for vm in matches)
        raise LookupError(f"several VMs are named {reference!r}: {listed}; give the id")
    return matches[0]
