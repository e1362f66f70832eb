"""Writes of projects: personal projects made on first use; the API's project, member and quota changes.

Invariants kept here: a project always has an admin (the last one is neither removed nor
demoted); the owner of a personal project stays its admin, and a personal project keeps its name
and is never deleted; a project is deleted only when none of its VMs is left but deleted ones.
"""

from collections.abc import Iterable, Mapping
from typing import Final

from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, connection, transaction
from django.db.models import ProtectedError

from apps.core.authentication import forget_user
from apps.core.db import columns, fetch_instances, now_and_after_commit, postgresql_or
from apps.core.errors import Conflict, InvalidInput, NotFound
from apps.vms.choices import VMState

from .models import PERSONAL_PREFIX, Membership, Project, Role


def personal_project(user: AbstractBaseUser) -> Project:
    """The user's personal project, made (with the user as its admin) on first use.

    Concurrent first uses make it once: the loser of the race on ``personal_of`` reads the winner's.
    """
    found = Project.objects.filter(personal_of_id=user.pk).first()
    if found is not None:
        return found
    try:
        with transaction.atomic():
            name = f"{PERSONAL_PREFIX}{user.get_username()}"
            project = Project.objects.create(name=name, personal_of_id=user.pk, **Project.default_quota())
            Membership.objects.create(project=project, user_id=user.pk, role=Role.ADMIN)
    except IntegrityError:
        return Project.objects.get(personal_of_id=user.pk)
    return project


# --- The API's writes: projects, members, quotas ------------------------------------------------------
#
# Every change of who is a member, or in which role, drops the changed users' token memos (which
# carry their roles, read by the VM read fast path) at once and again after commit, so no request
# answers with the old roles once the change is committed. Membership changes and quota writes lock
# the project row (FOR NO KEY UPDATE), as VM creates do before their quota check: a project's
# members, its last admin and its quota change one writer at a time.

# Upper bounds of a project's limits: far above any fleet, below the columns' integer ranges.
QUOTA_LIMIT_MAX: Final = {
    "max_vms": 10**9,
    "max_vcpus": 10**9,
    "max_memory_mb": 10**13,
    "max_networks": 10**6,
}


def memberships_changed(user_ids: Iterable[int]) -> None:
    """Drop the token memos of ``user_ids`` now (this request's own reads stop trusting them) and
    after commit (no concurrent request that read the old roles stored them again in between)."""
    users = list(dict.fromkeys(user_ids))

    def forget() -> None:
        for user_id in users:
            forget_user(user_id)

    now_and_after_commit(forget)


def _lock_project_by_orm(project_id: int, *, no_key: bool = True) -> Project:
    # The ORM leaves the lock out where there is none (SQLite).
    found = Project.objects.select_for_update(no_key=no_key).filter(pk=project_id).first()
    if found is None:
        raise NotFound("No such project.")
    return found


@postgresql_or(_lock_project_by_orm)
def lock_project(project_id: int, *, no_key: bool = True) -> Project:
    """The project's row, locked until the transaction ends; 404 when it went meanwhile (a create
    that waited for the lock of a project being deleted). One fixed prepared statement: the ORM
    compiled it on every VM create.

    FOR NO KEY UPDATE (``no_key``: quota-checked writes, membership and quota changes), not FOR
    UPDATE: it still excludes a concurrent lock of the project, but not the KEY SHARE lock PostgreSQL
    takes on the row when another transaction inserts a row referencing it (a VM of a create that
    does not check quotas); with FOR UPDATE on the owner's row, a rename waiting for a VM row locked
    by a migration request that itself waited for the user row deadlocked (seen in the soak test).
    FOR UPDATE (``no_key`` False) before deleting the project: it waits for those inserts too.
    """
    table = connection.ops.quote_name(Project._meta.db_table)
    strength = "NO KEY UPDATE" if no_key else "UPDATE"
    sql = f"SELECT {columns(Project, 'p')} FROM {table} p WHERE p.id = %s FOR {strength}"  # noqa: S608
    found = fetch_instances(Project, sql, [project_id])
    if not found:
        raise NotFound("No such project.")
    return found[0]


def _check_name_free(name: str, *, project_id: int | None = None) -> None:
    others = Project.objects.filter(name=name)
    if project_id is not None:
        others = others.exclude(pk=project_id)
    if others.exists():
        raise _name_taken(name)


def _name_taken(name: str) -> InvalidInput:
    message = f"A project named {name!r} already exists."
    return InvalidInput(message, fields={"name": [message]})


def _vm_bodies_changed() -> None:
    """Every cached VM body and list is stale: VM bodies show their project's name (a rename), and
    lists of deleted VMs may show the records a project deletion removes. (Both are rare.)"""
    # Imported here: apps.vms.models imports this module (personal_project), and apps.vms.cache
    # imports apps.vms.models.
    from apps.vms import cache as vm_cache  # noqa: PLC0415

    vm_cache.fleet_changed()


@transaction.atomic
def project_create(*, creator: AbstractBaseUser, name: str, description: str = "") -> Project:
    """A team project named ``name`` (checked by the caller against ``name_validator``) with the
    default quota; its creator is its admin."""
    _check_name_free(name)
    try:
        with transaction.atomic():
            project = Project.objects.create(name=name, description=description, **Project.default_quota())
    except IntegrityError as exc:  # the same name, created concurrently
        raise _name_taken(name) from exc
    Membership.objects.create(project=project, user_id=creator.pk, role=Role.ADMIN)
    memberships_changed([creator.pk])
    return project


@transaction.atomic
def project_update(*, project: Project, name: str | None = None, description: str | None = None) -> Project:
    """Change a project's description, or a team project's name (a personal project keeps its
    ``~<username>``)."""
    project = lock_project(project.pk)
    updated = []
    if name is not None and name != project.name:
        if project.personal_of_id is not None:
            message = "A personal project keeps its name."
            raise InvalidInput(message, fields={"name": [message]})
        _check_name_free(name, project_id=project.pk)
        project.name = name
        updated.append("name")
    if description is not None and description != project.description:
        project.description = description
        updated.append("description")
    if updated:
        try:
            with transaction.atomic():
                project.save(update_fields=updated)
        except IntegrityError as exc:
            raise _name_taken(project.name) from exc
    if "name" in updated:
        _vm_bodies_changed()
    return project


@transaction.atomic
def project_delete(*, project: Project) -> None:
    """Delete a team project that has no VM left but deleted ones (409 otherwise), with the records
    of its deleted VMs (and their migrations), its batches and its networks.

    The row is locked FOR UPDATE first: a concurrent create (which locks it FOR NO KEY UPDATE, and
    whose insert takes KEY SHARE) either committed before, and its VM is seen here, or waits and
    then finds the project gone.
    """
    if project.personal_of_id is not None:
        raise Conflict("A personal project cannot be deleted.")
    project = lock_project(project.pk, no_key=False)
    live = project.vms.exclude(state=VMState.DELETED).count()
    if live:
        raise Conflict(f"The project still has {live} VM(s) that are not deleted; delete them first.")
    members = list(project.memberships.values_list("user_id", flat=True))
    project.batches.all().delete()
    project.vms.all().delete()  # and their NICs
    try:
        with transaction.atomic():
            project.networks.all().delete()
            project.delete()
    except ProtectedError as exc:  # rows of another kind that protect it (PROTECT foreign keys)
        raise Conflict(
            "The project still owns VMs or batches, or a shared network other projects' VMs use; "
            "delete them first."
        ) from exc
    memberships_changed(members)
    _vm_bodies_changed()


def _admins_left(project: Project, *, without: Membership) -> int:
    return project.memberships.filter(role=Role.ADMIN).exclude(pk=without.pk).count()


def _check_keeps_an_admin(project: Project, membership: Membership, *, doing: str) -> None:
    """Refuse (409) taking the owner out of their personal project or its admin role, and leaving a
    project without an admin."""
    if project.personal_of_id == membership.user_id:
        raise Conflict(f"The owner of a personal project cannot be {doing}.")
    if membership.role == Role.ADMIN and not _admins_left(project, without=membership):
        raise Conflict(f"The last admin of a project cannot be {doing}; make another member admin first.")


@transaction.atomic
def membership_add(*, project: Project, user: AbstractBaseUser, role: Role) -> Membership:
    """Make ``user`` a member of ``project`` in ``role`` (409 when they already are one)."""
    project = lock_project(project.pk)
    if project.memberships.filter(user_id=user.pk).exists():
        raise Conflict(f"{user.get_username()} is already a member of this project.")
    membership = Membership.objects.create(project=project, user_id=user.pk, role=role)
    memberships_changed([user.pk])
    return membership


def _current_membership(project: Project, membership: Membership) -> Membership:
    found = project.memberships.select_related("user").filter(pk=membership.pk).first()
    if found is None:
        raise NotFound("That user is not a member of this project.")
    return found


@transaction.atomic
def membership_change_role(*, membership: Membership, role: Role) -> Membership:
    """Give a member another role; the last admin (or a personal project's owner) stays admin."""
    project = lock_project(membership.project_id)
    membership = _current_membership(project, membership)
    if role != membership.role:
        if role != Role.ADMIN:
            _check_keeps_an_admin(project, membership, doing="demoted")
        membership.role = role
        membership.save(update_fields=["role"])
        memberships_changed([membership.user_id])
    return membership


@transaction.atomic
def membership_remove(*, membership: Membership) -> None:
    """Take a member out of a project (their access ends with this request); never the last admin,
    nor a personal project's owner."""
    project = lock_project(membership.project_id)
    membership = _current_membership(project, membership)
    _check_keeps_an_admin(project, membership, doing="removed")
    membership.delete()
    memberships_changed([membership.user_id])


@transaction.atomic
def project_set_quota(*, project: Project, limits: Mapping[str, int]) -> Project:
    """Set some of a project's limits (``QUOTA_LIMIT_MAX`` keys, checked by the caller). Limits below
    the current usage are allowed: the project's next creates and growing resizes are refused.

    The lock is the one VM creates take before their quota check, so a create either completed
    under the old limits or checks against the new ones.
    """
    project = lock_project(project.pk)
    unknown = set(limits) - set(QUOTA_LIMIT_MAX)
    if unknown:
        raise InvalidInput(f"Unknown quota limits: {', '.join(sorted(unknown))}.")
    for field, value in limits.items():
        setattr(project, field, value)
    project.save(update_fields=list(limits))
    return project
