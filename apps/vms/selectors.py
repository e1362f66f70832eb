"""Reads of the fleet, always through the caller's tenancy: users see their own, staff see all."""

from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db.models import Count, Q, QuerySet, Sum
from django.db.models.functions import Coalesce

from .choices import VMState
from .models import VM, BatchOperation, Quota

AnyUser = AbstractBaseUser | AnonymousUser


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


def _is_staff(user: AnyUser) -> bool:
    return bool(getattr(user, "is_staff", False))


def vm_visible(*, user: AnyUser) -> QuerySet[VM]:
    """Every VM ``user`` may see, deleted ones included (for detail lookups)."""
    queryset = VM.objects.select_related("node", "image", "owner")
    return queryset if _is_staff(user) else queryset.filter(owner_id=user.pk)


def vm_list(*, user: AnyUser, state: str | None = None, include_deleted: bool = False) -> QuerySet[VM]:
    """The VM list: live VMs unless ``state`` asks for another, newest first (index-backed)."""
    queryset = vm_visible(user=user)
    if state:
        return queryset.filter(state=state)
    if not include_deleted:
        queryset = queryset.filter(~Q(state=VMState.DELETED))
    return queryset


# The VM list's read path without DRF's per-field cost: ``.values()`` rows (one query, the names
# joined in) turned into ``VMSerializer``'s exact shape by a plain function.
VM_ROW_FIELDS = (
    "id",
    "name",
    "owner__username",
    "node__name",
    "image__name",
    "state",
    "state_reason",
    "pending_action",
    "vcpus",
    "memory_mb",
    "disk_gb",
    "created_at",
    "updated_at",
)


def _iso(value: datetime | None) -> str | None:
    """A timestamp as DRF's ``DateTimeField`` writes it: ISO 8601 in UTC with a ``Z``."""
    if value is None:
        return None
    text = value.astimezone(UTC).isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def vm_rows(queryset: QuerySet[VM]) -> QuerySet[VM, dict[str, Any]]:
    return queryset.values(*VM_ROW_FIELDS)


def vm_row_data(row: dict[str, Any]) -> dict[str, Any]:
    """One ``vm_rows`` row as ``VMSerializer`` represents the VM."""
    return {
        "id": str(row["id"]),
        "name": row["name"],
        "owner": row["owner__username"],
        "node": row["node__name"],
        "image": row["image__name"],
        "state": row["state"],
        "state_reason": row["state_reason"],
        "pending_action": row["pending_action"],
        "vcpus": row["vcpus"],
        "memory_mb": row["memory_mb"],
        "disk_gb": row["disk_gb"],
        "created_at": _iso(row["created_at"]),
        "updated_at": _iso(row["updated_at"]),
    }


def vm_row_representation(row: dict[str, Any]) -> dict[str, Any]:
    """A row of ``reads.rows`` (``VMSerializer``'s fields, timestamps as datetimes) as DRF shows it."""
    return {**row, "created_at": _iso(row["created_at"]), "updated_at": _iso(row["updated_at"])}


def _choice(value: Any) -> Any:
    """A choice as DRF's ``ChoiceField`` writes it: its value (an empty or missing one as it is)."""
    return value if value in ("", None) else str(value)


def vm_data(vm: VM) -> dict[str, Any]:
    """``VMSerializer``'s representation of a VM whose owner, node and image are loaded, without
    DRF's per-field machinery (a fifth of a create's CPU with the rest of the answer)."""
    return {
        "id": str(vm.pk),
        "name": vm.name,
        "owner": vm.owner.username,
        "node": None if vm.node is None else vm.node.name,
        "image": vm.image.name,
        "state": _choice(vm.state),
        "state_reason": vm.state_reason,
        "pending_action": _choice(vm.pending_action),
        "vcpus": vm.vcpus,
        "memory_mb": vm.memory_mb,
        "disk_gb": vm.disk_gb,
        "created_at": _iso(vm.created_at),
        "updated_at": _iso(vm.updated_at),
    }


def batch_visible(*, user: AnyUser) -> QuerySet[BatchOperation]:
    queryset = BatchOperation.objects.all()
    return queryset if _is_staff(user) else queryset.filter(owner_id=user.pk)
