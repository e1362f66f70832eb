"""What a project may still create: its quota and usage, the names its live VMs hold, the images' minimums.

A quota-checked write takes the project's lock first (:func:`apps.projects.services.lock_project`),
then reads its state (:func:`project_state`, one round trip on PostgreSQL) and checks
(:func:`check_quota`, :func:`check_new_names`): concurrent writes of one project are serialized, so
they cannot both pass.
"""

from collections.abc import Sequence
from typing import Any

from apps.core.db import fetch_prepared, postgresql_or
from apps.core.errors import InvalidInput, QuotaExceeded
from apps.vms.choices import VMState
from apps.vms.models import VM, Image
from apps.vms.selectors import Limits, Usage, project_quota, project_usage

# A create's checks in one round trip (after the project's lock, so that its snapshot sees every VM
# committed before): the project's quota, its live VMs' usage and which of the new
# names are taken. PostgreSQL's SQL (arrays); other databases run the ORM queries one by one. The
# deleted state is a literal in the statement: a parameter there kept PostgreSQL from the partial
# indexes in the generic plan of the prepared statement (10 ms), so it planned every create anew.
_PROJECT_STATE_SQL = """
SELECT q.max_vms, q.max_vcpus, q.max_memory_mb, u.vms, u.vcpus, u.memory_mb, t.names
FROM (
    SELECT count(*), coalesce(sum(vcpus), 0), coalesce(sum(memory_mb), 0)
    FROM vms WHERE project_id = %(project)s AND state <> 'deleted'
) AS u(vms, vcpus, memory_mb)
CROSS JOIN (
    SELECT coalesce(array_agg(name), '{}')
    FROM vms WHERE project_id = %(project)s AND state <> 'deleted' AND name = ANY(%(names)s)
) AS t(names)
JOIN projects AS q ON q.id = %(project)s
"""


def _project_state_by_orm(project_id: int, names: Sequence[str]) -> tuple[Limits, Usage, set[str]]:
    taken = VM.objects.filter(project_id=project_id, name__in=set(names)).exclude(state=VMState.DELETED)
    quota, usage = project_quota(project_id=project_id), project_usage(project_id=project_id)
    return quota, usage, set(taken.values_list("name", flat=True))


@postgresql_or(_project_state_by_orm)
def project_state(project_id: int, names: Sequence[str]) -> tuple[Limits, Usage, set[str]]:
    """The project's quota, usage and which of ``names`` its live VMs already have."""
    ((max_vms, max_vcpus, max_memory_mb, vms, vcpus, memory_mb, taken_names),) = fetch_prepared(
        _PROJECT_STATE_SQL, {"project": project_id, "names": list(set(names))}
    )
    return Limits(max_vms, max_vcpus, max_memory_mb), Usage(vms, vcpus, memory_mb), set(taken_names)


def check_quota(
    project_id: int, *, vms: int, vcpus: int, memory_mb: int, known: tuple[Limits, Usage] | None = None
) -> None:
    """Refuse (403) what would take the project over its quota; ``known``: quota and usage already read."""
    limits, usage = known or (project_quota(project_id=project_id), project_usage(project_id=project_id))
    problems = []
    if usage.vms + vms > limits.max_vms:
        problems.append(f"VMs {usage.vms}+{vms} > {limits.max_vms}")
    if usage.vcpus + vcpus > limits.max_vcpus:
        problems.append(f"vCPUs {usage.vcpus}+{vcpus} > {limits.max_vcpus}")
    if usage.memory_mb + memory_mb > limits.max_memory_mb:
        problems.append(f"memory {usage.memory_mb}+{memory_mb} MiB > {limits.max_memory_mb} MiB")
    if problems:
        raise QuotaExceeded("Quota exceeded: " + "; ".join(problems) + ".")


def check_new_names(project_id: int, names: Sequence[str], key: Any, taken: set[str] | None = None) -> None:
    """Refuse (400) names repeated in ``names`` or held by a live VM of the project (``taken``, when read)."""
    errors: dict[str, list[str]] = {}
    first_seen: dict[str, int] = {}
    for index, name in enumerate(names):
        if name in first_seen:
            errors[key(index)] = [f"Name {name!r} is repeated (first at item {first_seen[name]})."]
        first_seen.setdefault(name, index)
    if taken is None:
        taken = set(
            VM.objects.filter(project_id=project_id, name__in=set(names))
            .exclude(state=VMState.DELETED)
            .values_list("name", flat=True)
        )
    for index, name in enumerate(names):
        if name in taken:
            errors.setdefault(key(index), []).append(name_taken(name))
    if errors:
        raise InvalidInput(next(iter(errors.values()))[0], fields=errors)


def name_taken(name: str) -> str:
    return f"The project already has a VM named {name!r}."


def image_refusal(image: Image, *, memory: int, disk: int) -> str | None:
    """Why a VM with ``memory`` MiB and a ``disk`` GiB disk cannot boot ``image`` (its minimums); None
    if it can. Which images a project may boot at all is the serializer's (``UsableImageField``)."""
    if memory < image.min_memory_mb:
        return f"Image {image.name} needs at least {image.min_memory_mb} MiB of memory."
    if disk < image.min_disk_gb:
        return f"Image {image.name} needs a disk of at least {image.min_disk_gb} GiB."
    return None
