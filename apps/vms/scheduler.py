"""Placement: pick nodes for VMs and reserve their capacity atomically.

Filter: nodes that are ``up`` with enough free vCPUs, memory and disk (and, for a VM with NICs, whose
registration said they can attach them: ``Node.networking`` empty). Weigh: the most free memory
first, recomputed after every placement so a batch spreads across nodes. A single VM free to go
anywhere is placed and reserved by one statement on the best node that no concurrent reservation
holds. Otherwise reservation is one conditional UPDATE of the chosen nodes (it checks their room and
takes it; several rows are locked in id order first, so concurrent callers cannot deadlock), falling
back to ``SELECT ... FOR UPDATE`` of every candidate when a plan went stale (see :func:`reserve`);
the node table's check constraints refuse an overcommit whatever path writes it.
Call these functions inside the caller's transaction.
"""

import functools
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from django.db import connection, transaction
from django.db.models import F
from django.db.models.functions import Greatest

from apps.core.db import columns, fetch_instances, none_elsewhere, postgresql_or
from apps.core.errors import NoCapacity

from .choices import NodeStatus
from .models import Node


@dataclass(frozen=True)
class Demand:
    vcpus: int
    memory_mb: int
    disk_gb: int
    networked: bool = False  # the VM has NICs: only nodes that can attach them (``Node.networking`` "")


@dataclass
class _Room:
    pk: int
    vcpus: int
    memory_mb: int
    disk_gb: int
    networking: str = ""  # why the node cannot attach NICs ("": it can)

    def fits(self, demand: Demand) -> bool:
        return (
            (not demand.networked or not self.networking)
            and self.vcpus >= demand.vcpus
            and self.memory_mb >= demand.memory_mb
            and self.disk_gb >= demand.disk_gb
        )

    def take(self, demand: Demand) -> None:
        self.vcpus -= demand.vcpus
        self.memory_mb -= demand.memory_mb
        self.disk_gb -= demand.disk_gb


def _describe(demand: Demand) -> str:
    return f"{demand.vcpus} vCPUs, {demand.memory_mb} MiB, {demand.disk_gb} GiB"


_CAPACITY = (
    "pk",
    "vcpus",
    "allocated_vcpus",
    "memory_mb",
    "allocated_memory_mb",
    "disk_gb",
    "allocated_disk_gb",
    "networking",
)


def _rooms(rows: Iterable[tuple[int, int, int, int, int, int, int, str]]) -> dict[int, _Room]:
    return {
        pk: _Room(pk, cpu - cpu_used, mem - mem_used, disk - disk_used, networking)
        for pk, cpu, cpu_used, mem, mem_used, disk, disk_used, networking in rows
    }


NO_NICS_HINT: Final = "Create it with `networks: []` for a VM without NICs."


def _no_network_node(rooms: dict[int, _Room], demand: Demand, where: str) -> NoCapacity | None:
    """Why a VM with NICs fits nowhere when only the nodes that cannot attach NICs have its room."""
    if not demand.networked:
        return None
    plain = Demand(demand.vcpus, demand.memory_mb, demand.disk_gb)
    unable = [room for room in rooms.values() if room.networking and room.fits(plain)]
    if not unable:
        return None
    reasons = "; ".join(sorted({room.networking for room in unable}))
    return NoCapacity(
        f"No node that can attach NICs has room for {_describe(demand)}{where}: the nodes with room "
        f"cannot ({reasons}). {NO_NICS_HINT}"
    )


def _place(
    rooms: dict[int, _Room], demands: Sequence[Demand | None], pins: Sequence[Node | None]
) -> list[int | None]:
    """The node id of each demand (most free memory first, recomputed after each placement)."""
    chosen: list[int | None] = []
    for index, (demand, pin) in enumerate(zip(demands, pins, strict=True)):
        if demand is None:
            chosen.append(None)
            continue
        if pin is not None:
            room = rooms.get(pin.pk)
            if room is None:
                raise NoCapacity(f"Node {pin.name} is not accepting VMs (status {pin.status}).")
            if demand.networked and room.networking:
                raise NoCapacity(f"Node {pin.name} cannot attach NICs ({room.networking}). {NO_NICS_HINT}")
            if not room.fits(demand):
                raise NoCapacity(f"Node {pin.name} has no room for {_describe(demand)}.")
        else:
            fitting = [room for room in rooms.values() if room.fits(demand)]
            if not fitting:
                where = f" (item {index})" if len(demands) > 1 else ""
                raise _no_network_node(rooms, demand, where) or NoCapacity(
                    f"No node has room for {_describe(demand)}{where}."
                )
            room = max(fitting, key=lambda r: (r.memory_mb, r.vcpus, -r.pk))
        room.take(demand)
        chosen.append(room.pk)
    return chosen


def _totals(plan: Sequence[int | None], demands: Sequence[Demand | None]) -> dict[int, Demand]:
    taken: dict[int, Demand] = {}
    for node_id, demand in zip(plan, demands, strict=True):
        if node_id is None or demand is None:
            continue
        total = taken.get(node_id, Demand(0, 0, 0))
        taken[node_id] = Demand(
            total.vcpus + demand.vcpus, total.memory_mb + demand.memory_mb, total.disk_gb + demand.disk_gb
        )
    return taken


class _Stale(Exception):
    """A node of the plan no longer has its room (rolls the savepoint back, releasing the rows locked)."""


# The plan's reservations when the rows still have the room: the capacity checks and the updates are
# one statement and one round trip for every node of the plan (no SELECT ... FOR UPDATE and Python
# check before it). A concurrent reservation of a row makes this wait for its commit, then
# PostgreSQL checks the WHERE again on the row as that commit left it. Parameters: arrays of node
# ids and of the vCPUs, MiB and GiB to add to each, the status a node must have.
_TAKE_SQL = """
UPDATE nodes AS n
SET allocated_vcpus = n.allocated_vcpus + t.vcpus,
    allocated_memory_mb = n.allocated_memory_mb + t.memory_mb,
    allocated_disk_gb = n.allocated_disk_gb + t.disk_gb
FROM unnest(%s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[]) AS t(id, vcpus, memory_mb, disk_gb)
WHERE n.id = t.id AND n.status = %s
  AND n.vcpus - n.allocated_vcpus >= t.vcpus
  AND n.memory_mb - n.allocated_memory_mb >= t.memory_mb
  AND n.disk_gb - n.allocated_disk_gb >= t.disk_gb
RETURNING n.*
"""
# Rows one UPDATE changes are locked in the order of its join, not by id: a plan on several nodes
# locks its rows in id order first, so that two such plans cannot each hold a row the other wants.
_LOCK_SQL = "SELECT id FROM nodes WHERE id = ANY(%s::bigint[]) ORDER BY id FOR NO KEY UPDATE"


# One demand on any node, in one statement: the node with the most free memory (then vCPUs, then the
# lowest id, as :func:`_place` weighs) that has the room and that no concurrent reservation holds is
# locked and charged. A node another transaction is reserving on is skipped rather than waited for,
# so concurrent creates spread over the nodes instead of queuing on one row; the locked row is the
# newest version, rechecked for room (PostgreSQL's rule for FOR UPDATE in READ COMMITTED).
_TAKE_BEST_SQL = """
UPDATE nodes AS n
SET allocated_vcpus = n.allocated_vcpus + %(vcpus)s,
    allocated_memory_mb = n.allocated_memory_mb + %(memory_mb)s,
    allocated_disk_gb = n.allocated_disk_gb + %(disk_gb)s
FROM (
    SELECT id FROM nodes
    WHERE status = %(status)s{networked}
      AND vcpus - allocated_vcpus >= %(vcpus)s
      AND memory_mb - allocated_memory_mb >= %(memory_mb)s
      AND disk_gb - allocated_disk_gb >= %(disk_gb)s
    ORDER BY memory_mb - allocated_memory_mb DESC, vcpus - allocated_vcpus DESC, id
    LIMIT 1
    FOR NO KEY UPDATE SKIP LOCKED
) AS best
WHERE n.id = best.id
RETURNING {columns}
"""


@functools.cache
def _take_best_sql(networked: bool) -> str:
    """The statement for a VM with NICs (only nodes that can attach them) or without."""
    only_networking = " AND networking = ''" if networked else ""
    return _TAKE_BEST_SQL.format(columns=columns(Node, "n"), networked=only_networking)


@postgresql_or(none_elsewhere)
def _take_best(demand: Demand) -> Node | None:
    """Reserve ``demand`` on the best free node (:data:`_TAKE_BEST_SQL`); None, holding no lock, when
    no node with the room is free of concurrent reservations (or there is none at all)."""
    params = {
        "vcpus": demand.vcpus,
        "memory_mb": demand.memory_mb,
        "disk_gb": demand.disk_gb,
        "status": NodeStatus.UP.value,
    }
    # Prepared: PostgreSQL planned it on every create (half of its 0.54 ms, the statement log).
    found = fetch_instances(Node, _take_best_sql(demand.networked), params)
    return found[0] if found else None


@postgresql_or(none_elsewhere)  # elsewhere (SQLite) the caller's locked path places
def _take_all(taken: dict[int, Demand]) -> dict[int, Node] | None:
    """Reserve the plan's totals; None, with nothing reserved and no row left locked, if one fails.

    In a savepoint, which a failure rolls back: an UPDATE that waited for a concurrent reservation
    and then found the room gone still holds the row's lock (PostgreSQL locks the newest version
    before checking the WHERE again), and the caller's fallback locks every node in id order, which
    it must do holding none of them (two transactions each holding the row the other waits for
    deadlocked in ``test_concurrent_creates_never_overcommit``).
    """
    ids = sorted(taken)
    params = [
        ids,
        [taken[pk].vcpus for pk in ids],
        [taken[pk].memory_mb for pk in ids],
        [taken[pk].disk_gb for pk in ids],
        NodeStatus.UP,
    ]
    try:
        with transaction.atomic():
            if len(ids) > 1:
                with connection.cursor() as cursor:
                    cursor.execute(_LOCK_SQL, [ids])
            nodes = {node.pk: node for node in Node.objects.raw(_TAKE_SQL, params)}
            if len(nodes) < len(ids):
                raise _Stale
            return nodes
    except _Stale:
        return None


def reserve(
    *,
    demands: Sequence[Demand | None],
    pinned: Sequence[Node | None] | None = None,
    exclude: Iterable[int] = (),
) -> list[Node | None]:
    """Place each demand (``None`` entries are skipped) and reserve the capacity; return the chosen nodes.

    ``pinned[i]``, when given, forces demand ``i`` onto that node (still checked for status and room).
    Raises ``NoCapacity`` naming the first demand that fits nowhere; then nothing is reserved.

    A single demand free to go anywhere is placed and reserved by one statement (:func:`_take_best`)
    on the best node no concurrent reservation holds. Otherwise, or when that finds no such node, the
    placement is planned on the candidates' current capacity read without locks, then each chosen
    node's total is reserved by one conditional UPDATE (:data:`_TAKE_SQL`), which locks the row only
    from there to the commit. Concurrent creates used to queue on a lock of every node, and then on a
    ``SELECT ... FOR UPDATE`` of the chosen node held across the rest of the transaction (the
    benchmark's mixed load spent most of its write latency there). When a node no longer has the room
    (a concurrent reservation took it) or the plan found none, the placement runs again on every
    candidate locked, as it always did, and is then exact.
    """
    pins = list(pinned) if pinned is not None else [None] * len(demands)
    excluded = set(exclude)
    if len(demands) == 1 and demands[0] is not None and pins[0] is None and not excluded:
        best = _take_best(demands[0])
        if best is not None:
            return [best]
    candidates = Node.objects.filter(status=NodeStatus.UP).order_by("id")
    if all(pin is not None for pin, demand in zip(pins, demands, strict=True) if demand is not None):
        candidates = candidates.filter(pk__in={pin.pk for pin in pins if pin is not None})
    snapshot = _rooms(row for row in candidates.values_list(*_CAPACITY) if row[0] not in excluded)
    try:
        plan = _place(snapshot, demands, pins)
    except NoCapacity:
        plan = []
    reserved = _take_all(_totals(plan, demands)) if plan else None
    if reserved is None:
        nodes = {node.pk: node for node in candidates.select_for_update() if node.pk not in excluded}
        rooms = {
            pk: _Room(pk, node.free_vcpus, node.free_memory_mb, node.free_disk_gb, node.networking)
            for pk, node in nodes.items()
        }
        plan = _place(rooms, demands, pins)
        for node_id, total in _totals(plan, demands).items():
            Node.objects.filter(pk=node_id).update(
                allocated_vcpus=F("allocated_vcpus") + total.vcpus,
                allocated_memory_mb=F("allocated_memory_mb") + total.memory_mb,
                allocated_disk_gb=F("allocated_disk_gb") + total.disk_gb,
            )
        reserved = nodes
    return [None if node_id is None else reserved[node_id] for node_id in plan]


def release(*, node_id: int, demand: Demand) -> None:
    """Give back capacity held on a node (never below zero)."""
    Node.objects.filter(pk=node_id).update(
        allocated_vcpus=Greatest(F("allocated_vcpus") - demand.vcpus, 0),
        allocated_memory_mb=Greatest(F("allocated_memory_mb") - demand.memory_mb, 0),
        allocated_disk_gb=Greatest(F("allocated_disk_gb") - demand.disk_gb, 0),
    )


def release_many(*, held: Iterable[tuple[int, Demand]]) -> None:
    """Release a list of ``(node_id, demand)`` with one UPDATE per node."""
    totals: dict[int, Counter[str]] = {}
    for node_id, demand in held:
        counter = totals.setdefault(node_id, Counter())
        counter.update(vcpus=demand.vcpus, memory_mb=demand.memory_mb, disk_gb=demand.disk_gb)
    for node_id, counter in totals.items():
        release(node_id=node_id, demand=Demand(counter["vcpus"], counter["memory_mb"], counter["disk_gb"]))
