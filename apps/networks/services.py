"""Writes of networks and NICs: create, rename, delete; the default network; address allocation.

Locks, always in this order: the project's row (:func:`apps.projects.services.lock_project`: quota
checks, names, the default network), then the networks' rows in id order (IPAM: who holds a
network's lock reads its taken addresses and hands out the lowest free ones until it commits), then
the nodes' (the scheduler). A VNI is an unused one drawn at random, written in a savepoint: two
creates that drew the same one meet the unique index and the loser draws again.
"""

import functools
import ipaddress
import secrets
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final, cast

from django.db import IntegrityError, transaction
from django.db.models import Q

from apps.core.db import bulk_insert, columns, fetch_instances, fetch_prepared, on_postgresql, postgresql_or
from apps.core.errors import Conflict, InvalidInput, NoAddress, QuotaExceeded
from apps.projects.models import Project
from apps.projects.services import lock_project
from apps.vms.models import VM

from . import addresses
from .models import DEFAULT_MTU, DEFAULT_NETWORK, VNI_MAX, VNI_MIN, Network, Nic
from .nics import keep_written

VNI_ATTEMPTS: Final = 8  # concurrent creates that picked the same VNI pick again
MAC_ATTEMPTS: Final = 8  # draws of new MACs for those already taken


def _name_taken(name: str) -> InvalidInput:
    message = f"The project already has a network named {name!r}."
    return InvalidInput(message, fields={"name": [message]})


def _free_vni() -> int:
    """An unused VNI, drawn at random among 16 million: concurrent creates seldom draw the same one,
    so they seldom wait for each other's commit on the unique index (taking the next free one made
    every concurrent create wait for the first). A drawn VNI in use fails the insert and is drawn
    again (:func:`_insert`); a nearly full space is searched."""
    if Network.objects.count() < (VNI_MAX - VNI_MIN) // 2:
        return secrets.randbelow(VNI_MAX) + VNI_MIN
    used = set(Network.objects.values_list("vni", flat=True))
    free = next((vni for vni in range(VNI_MIN, VNI_MAX + 1) if vni not in used), None)
    if free is None:
        raise Conflict("Every VXLAN network identifier is in use.")
    return free


def _insert(network: Network) -> Network:
    """Save a new network with a VNI of its own (picked again when a concurrent create took it)."""
    for _attempt in range(VNI_ATTEMPTS):
        network.vni = _free_vni()
        try:
            with transaction.atomic():
                network.save(force_insert=True)
            return network
        except IntegrityError:
            if Network.objects.filter(project_id=network.project_id, name=network.name).exists():
                raise _name_taken(network.name) from None
    raise Conflict("Concurrent network creates kept taking the same VXLAN identifier; retry.")


def _check_network_quota(project: Project, adding: int = 1) -> None:
    owned = Network.objects.filter(project_id=project.pk).count()
    if owned + adding > project.max_networks:
        raise QuotaExceeded(f"Quota exceeded: networks {owned}+{adding} > {project.max_networks}.")


def _neighbours(project_id: int, *, exclude: int | None = None) -> list[Network]:
    """The networks a network of ``project_id`` must not overlap: the project's and the shared ones."""
    found = Network.objects.filter(Q(project_id=project_id) | Q(shared=True))
    if exclude is not None:
        found = found.exclude(pk=exclude)
    return list(found.only("name", "cidr"))


def _check_overlaps(network: Network) -> None:
    neighbours = {other.cidr: other.name for other in _neighbours(network.project_id)}
    clashes = addresses.overlapping(network.cidr, neighbours)
    if clashes:
        names = ", ".join(f"{neighbours[cidr]} ({cidr})" for cidr in clashes)
        message = f"{network.cidr} overlaps networks this project reaches: {names}."
        raise InvalidInput(message, fields={"cidr": [message]})


@transaction.atomic
def network_create(
    *,
    project_id: int,
    name: str,
    cidr: str,
    gateway: str | None = None,
    dns: Sequence[str] = (),
    mtu: int = DEFAULT_MTU,
    shared: bool = False,
    external: bool = False,
    physical_network: str = "",
) -> Network:
    """A network of ``project_id`` within its quota of networks, overlapping none it reaches (its
    own and the shared ones), with the next free VNI. ``gateway``: the first host by default."""
    project = lock_project(project_id)
    _check_network_quota(project)
    if Network.objects.filter(project_id=project_id, name=name).exists():
        raise _name_taken(name)
    try:
        canonical = str(ipaddress.IPv4Network(cidr, strict=True))
    except ValueError as exc:
        message = f"{cidr!r} is not an IPv4 network in CIDR form ({exc})."
        raise InvalidInput(message, fields={"cidr": [message]}) from exc
    network = Network(
        project=project,
        name=name,
        cidr=canonical,
        gateway=gateway or addresses.first_host(canonical),
        dns=list(dns),
        mtu=mtu,
        shared=shared,
        external=external,
        physical_network=physical_network,
    )
    network.full_clean(exclude=["vni", "project"], validate_unique=False, validate_constraints=False)
    _check_overlaps(network)
    return _insert(network)


@transaction.atomic
def network_update(*, network: Network, name: str | None = None, dns: Sequence[str] | None = None) -> Network:
    """Rename a network or change its DNS servers (its addressing stays: NICs hold addresses of it).

    A rename changes what every VM attached to it shows: the VM answers cached anywhere are dropped.
    """
    network = Network.objects.select_for_update().get(pk=network.pk)
    updated = []
    if name is not None and name != network.name:
        if Network.objects.filter(project_id=network.project_id, name=name).exclude(pk=network.pk).exists():
            raise _name_taken(name)
        network.name = name
        updated.append("name")
    if dns is not None and list(dns) != network.dns:
        network.dns = list(dns)
        updated.append("dns")
    if not updated:
        return network
    network.full_clean(exclude=["vni", "project"], validate_unique=False, validate_constraints=False)
    try:
        with transaction.atomic():
            network.save(update_fields=[*updated, "updated_at"])
    except IntegrityError as exc:
        raise _name_taken(network.name) from exc
    if "name" in updated:
        from apps.vms import cache as vm_cache  # noqa: PLC0415 - apps.vms imports this app

        vm_cache.fleet_changed()  # VM answers show their networks' names, in any project (shared ones)
    return network


@transaction.atomic
def network_delete(*, network: Network) -> None:
    """Delete a network no NIC uses (409 otherwise: delete or detach its VMs first)."""
    network = Network.objects.select_for_update().get(pk=network.pk)
    used = Nic.objects.filter(network_id=network.pk).count()
    if used:
        raise Conflict(
            f"Network {network.name} is in use by {used} NIC(s) of VMs that are not deleted; "
            "delete those VMs first."
        )
    network.delete()


# --- Attaching VMs: which networks, the default one, addresses --------------------------------------


def default_network(project: Project) -> Network:
    """The project's network named ``default``, made on first use with a free 10.x.y.0/24 (none of
    the networks the project reaches overlap it; other projects' too, while 10/8 has room).

    The caller holds the project's lock (:func:`lock_project`): one create makes it, the others
    wait for that lock and find it.
    """
    found = fetch_instances(Network, _default_sql(), [project.pk, DEFAULT_NETWORK])
    if found:
        return found[0]
    _check_network_quota(project)
    reached: list[str] = []
    elsewhere: list[str] = []
    for project_id, shared, other in Network.objects.values_list("project_id", "shared", "cidr"):
        (reached if shared or project_id == project.pk else elsewhere).append(other)
    cidr = addresses.free_default_subnet(reached, elsewhere)
    if cidr is None:
        raise Conflict("No free /24 in 10.0.0.0/8 for the project's default network; give `networks`.")
    network = Network(
        project=project, name=DEFAULT_NETWORK, cidr=cidr, gateway=addresses.first_host(cidr), dns=[]
    )
    return _insert(network)


def _found(
    text: str, project: Project, by_id: dict[int, Network], by_name: dict[str, list[Network]]
) -> Network | str:
    """The network a reference names (an id first, then a name: the project's own, else the one
    shared network of that name), or why none."""
    network = by_id.get(int(text)) if text.isdigit() and len(text) < 19 else None
    if network is not None:
        return network
    candidates = by_name.get(text, [])
    own = [candidate for candidate in candidates if candidate.project_id == project.pk]
    if own or len(candidates) == 1:
        return (own or candidates)[0]
    if candidates:
        return f"Several shared networks are named {text!r}; give its id."
    return f"No network {text!r} in this project or shared with it."


def resolve_networks(
    project: Project, references: Sequence[Sequence[str] | None], item_key: Callable[[int], str]
) -> list[list[Network]]:
    """The networks each item attaches to, in order, from names or ids (``None``: the project's
    default network; an empty list: none). A network is found among the project's own and the
    shared ones; anything else is a 400 naming the reference (``item_key(index)``: the prefix of
    an item's error keys, ``""`` or ``"vms[3]."``). The caller holds the project's lock.
    """
    named = {str(reference) for refs in references if refs for reference in refs}
    ids = {int(text) for text in named if text.isdigit() and len(text) < 19}
    reachable = Network.objects.filter(Q(project_id=project.pk) | Q(shared=True))
    found = list(reachable.filter(Q(pk__in=ids) | Q(name__in=named))) if named else []
    by_id = {network.pk: network for network in found}
    by_name: dict[str, list[Network]] = {}
    for network in found:
        by_name.setdefault(network.name, []).append(network)
    errors: dict[str, list[str]] = {}
    default: Network | None = None
    chosen: list[list[Network]] = []
    for index, refs in enumerate(references):
        if refs is None:
            default = default or default_network(project)
            chosen.append([default])
            continue
        networks = []
        for position, reference in enumerate(refs):
            picked = _found(str(reference), project, by_id, by_name)
            if isinstance(picked, str):
                errors[f"{item_key(index)}networks[{position}]"] = [picked]
            else:
                networks.append(picked)
        chosen.append(networks)
    if errors:
        raise InvalidInput(next(iter(errors.values()))[0], fields=errors)
    return chosen


@dataclass
class AddressPlan:
    """The addresses given to each item's NICs (same shape as the networks), under the networks'
    locks: :func:`nics_insert` writes them once the VMs exist."""

    networks: list[list[Network]]
    addresses: list[list[str]] = field(default_factory=list)

    @property
    def network_ids(self) -> set[int]:
        return {network.pk for networks in self.networks for network in networks}


# A create's network look-ups as fixed statements, prepared once per connection: the ORM compiled
# the same three queries again on every create (~1 ms of its ~10 ms of CPU).
@functools.cache
def _default_sql() -> str:
    select = f"SELECT {columns(Network, 'n')} FROM networks AS n"  # noqa: S608
    return f"{select} WHERE n.project_id = %s AND n.name = %s LIMIT 1"


def _lock_networks_by_orm(ids: list[int]) -> list[Network]:
    return list(Network.objects.select_for_update(no_key=True).filter(pk__in=ids).order_by("pk"))


@postgresql_or(_lock_networks_by_orm)
def _lock_networks(ids: list[int]) -> list[Network]:
    """The networks of ``ids``, locked in id order (``FOR NO KEY UPDATE``: NICs may still reference them)."""
    return fetch_instances(Network, _lock_sql(), [ids])


@functools.cache
def _lock_sql() -> str:
    select = f"SELECT {columns(Network, 'n')} FROM networks AS n"  # noqa: S608
    return f"{select} WHERE n.id = ANY(%s) ORDER BY n.id FOR NO KEY UPDATE"


def _taken_by_orm(ids: list[int]) -> list[tuple[int, str]]:
    return list(Nic.objects.filter(network_id__in=ids).order_by().values_list("network_id", "ipv4"))


@postgresql_or(_taken_by_orm)
def _taken_addresses(ids: list[int]) -> list[tuple[int, str]]:
    """(network id, address) of every NIC of the networks of ``ids``."""
    return cast(list[tuple[int, str]], fetch_prepared(_TAKEN_SQL, [ids]))


_TAKEN_SQL: Final = "SELECT network_id, ipv4 FROM nics WHERE network_id = ANY(%s)"


def plan_addresses(networks: Sequence[Sequence[Network]]) -> AddressPlan:
    """Lock the networks (id order) and take the lowest free addresses for every NIC of the items.

    409 ``no_address`` naming the network that has too few left; nothing is taken then.
    """
    needed = Counter(network.pk for item in networks for network in item)
    plan = AddressPlan([list(item) for item in networks])
    if not needed:
        plan.addresses = [[] for _ in networks]
        return plan
    locked = {network.pk: network for network in _lock_networks(sorted(needed))}
    gone = set(needed) - set(locked)
    if gone:
        raise Conflict("A network of this request was deleted meanwhile; retry.")
    taken: dict[int, list[str]] = {pk: [] for pk in needed}
    # A statement of its own after the lock: its snapshot sees the NICs of the create that held it.
    for network_id, address in _taken_addresses(sorted(needed)):
        taken[network_id].append(address)
    free: dict[int, Iterator[str]] = {}
    for pk, count in needed.items():
        network = locked[pk]
        found = addresses.lowest_free(network.cidr, network.gateway, taken[pk], count)
        if len(found) < count:
            raise NoAddress(
                f"Network {network.name} ({network.cidr}) has {len(found)} free address(es), "
                f"{count} are needed."
            )
        free[pk] = iter(found)
    plan.addresses = [[next(free[network.pk]) for network in item] for item in networks]
    return plan


# New NICs in one statement that skips a MAC already taken (instead of a look-up of the drawn MACs
# first): the rows it returns are written, the others draw again. Rows: arrays of VM ids, network
# ids, indexes, MACs and addresses, one element per NIC.
_NICS_INSERT_SQL = """
INSERT INTO nics (vm_id, network_id, "index", mac, ipv4, created_at)
SELECT vm, network, position, mac, ipv4, now()
FROM unnest(%s::uuid[], %s::bigint[], %s::smallint[], %s::varchar[], %s::varchar[])
    AS t(vm, network, position, mac, ipv4)
ON CONFLICT (mac) DO NOTHING
RETURNING id, mac, created_at
"""


def _insert_skipping_taken_macs(nics: Sequence[Nic]) -> dict[str, tuple[int, datetime]]:
    """Write the NICs whose MAC is free; the id and creation time of each written one, by MAC."""
    rows = fetch_prepared(
        _NICS_INSERT_SQL,
        [
            [nic.vm_id for nic in nics],
            [nic.network_id for nic in nics],
            [nic.index for nic in nics],
            [nic.mac for nic in nics],
            [nic.ipv4 for nic in nics],
        ],
    )
    return {mac: (pk, created) for pk, mac, created in rows}


def _insert_by_orm(nics: Sequence[Nic]) -> dict[str, tuple[int, datetime]]:
    clashes = set(Nic.objects.filter(mac__in=[nic.mac for nic in nics]).values_list("mac", flat=True))
    fresh = [nic for nic in nics if nic.mac not in clashes]
    bulk_insert(fresh)
    return {
        mac: (pk, created)
        for pk, mac, created in Nic.objects.filter(mac__in=[nic.mac for nic in fresh]).values_list(
            "pk", "mac", "created_at"
        )
    }


def nics_insert(vms: Sequence[VM], plan: AddressPlan) -> list[Nic]:
    """The NICs of ``vms`` (VM rows just inserted, in the plan's order) with the planned addresses and
    new random MACs (a MAC already taken is drawn again), kept on each VM for its answer and its node
    task (:func:`apps.networks.nics.keep_written`).

    A MAC taken by another NIC is skipped by the insert and drawn again (one statement in all,
    unless a drawn MAC was taken: about one in 16 million per NIC and existing NIC pair).
    """
    nics = [
        Nic(vm=vm, network=network, index=index, mac="", ipv4=address)
        for vm, networks, taken in zip(vms, plan.networks, plan.addresses, strict=True)
        for index, (network, address) in enumerate(zip(networks, taken, strict=True))
    ]
    pending = list(nics)
    drawn: set[str] = set()
    insert = _insert_skipping_taken_macs if on_postgresql() else _insert_by_orm
    for _attempt in range(MAC_ATTEMPTS):
        if not pending:
            break
        for nic, mac in zip(pending, addresses.random_macs(len(pending), avoid=drawn), strict=True):
            nic.mac = mac
            drawn.add(mac)
        written = insert(pending)
        for nic in pending:
            if nic.mac in written:
                nic.pk, nic.created_at = written[nic.mac]
                nic._state.adding = False
        pending = [nic for nic in pending if nic.mac not in written]
    if pending:
        raise Conflict("Could not find free MAC addresses; retry.")
    by_vm: dict[uuid.UUID, list[Nic]] = {vm.pk: [] for vm in vms}
    for nic in nics:
        by_vm[nic.vm_id].append(nic)
    for vm in vms:
        keep_written(vm, by_vm[vm.pk])
    return nics


def nics_release(vm_ids: Iterable[uuid.UUID]) -> set[int]:
    """Free the addresses of deleted VMs (their NICs go); the networks they were on."""
    nics = Nic.objects.filter(vm_id__in=list(vm_ids))
    network_ids = set(nics.values_list("network_id", flat=True))
    if network_ids:
        nics.delete()
    return network_ids
