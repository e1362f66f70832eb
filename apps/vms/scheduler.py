"""Placement: pick nodes for VMs and reserve their capacity atomically.

Filter: nodes that are ``up`` with enough free vCPUs, memory and disk. Weigh: the most free memory
first, recomputed after every placement so a batch spreads across nodes. Reservation happens under
``SELECT ... FOR UPDATE`` of the candidate rows (taken in id order, so concurrent callers cannot
deadlock), and the node table's check constraints refuse an overcommit whatever path writes it.
Call these functions inside the caller's transaction.
"""

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from django.db.models import F
from django.db.models.functions import Greatest

from apps.core.errors import NoCapacity

from .choices import NodeStatus
from .models import Node


@dataclass(frozen=True)
class Demand:
    vcpus: int
    memory_mb: int
    disk_gb: int


@dataclass
class _Room:
    node: Node
    vcpus: int
    memory_mb: int
    disk_gb: int

    def fits(self, demand: Demand) -> bool:
        return (
            self.vcpus >= demand.vcpus
            and self.memory_mb >= demand.memory_mb
            and self.disk_gb >= demand.disk_gb
        )

    def take(self, demand: Demand) -> None:
        self.vcpus -= demand.vcpus
        self.memory_mb -= demand.memory_mb
        self.disk_gb -= demand.disk_gb


def _describe(demand: Demand) -> str:
    return f"{demand.vcpus} vCPUs, {demand.memory_mb} MiB, {demand.disk_gb} GiB"


def reserve(
    *,
    demands: Sequence[Demand | None],
    pinned: Sequence[Node | None] | None = None,
    exclude: Iterable[int] = (),
) -> list[Node | None]:
    """Place each demand (``None`` entries are skipped) and reserve the capacity; return the chosen nodes.

    ``pinned[i]``, when given, forces demand ``i`` onto that node (still checked for status and room).
    Raises ``NoCapacity`` naming the first demand that fits nowhere; then nothing is reserved.
    """
    pins = list(pinned) if pinned is not None else [None] * len(demands)
    excluded = set(exclude)
    nodes = Node.objects.select_for_update().filter(status=NodeStatus.UP).order_by("id")
    if all(pin is not None for pin, demand in zip(pins, demands, strict=True) if demand is not None):
        nodes = nodes.filter(pk__in={pin.pk for pin in pins if pin is not None})
    rooms = {
        node.pk: _Room(node, node.free_vcpus, node.free_memory_mb, node.free_disk_gb)
        for node in nodes
        if node.pk not in excluded
    }
    chosen: list[Node | None] = []
    taken: dict[int, Demand] = {}
    for index, (demand, pin) in enumerate(zip(demands, pins, strict=True)):
        if demand is None:
            chosen.append(None)
            continue
        if pin is not None:
            room = rooms.get(pin.pk)
            if room is None:
                raise NoCapacity(f"Node {pin.name} is not accepting VMs (status {pin.status}).")
            if not room.fits(demand):
                raise NoCapacity(f"Node {pin.name} has no room for {_describe(demand)}.")
        else:
            fitting = [room for room in rooms.values() if room.fits(demand)]
            if not fitting:
                where = f" (item {index})" if len(demands) > 1 else ""
                raise NoCapacity(f"No node has room for {_describe(demand)}{where}.")
            room = max(fitting, key=lambda r: (r.memory_mb, r.vcpus, -r.node.pk))
        room.take(demand)
        chosen.append(room.node)
        total = taken.get(room.node.pk, Demand(0, 0, 0))
        taken[room.node.pk] = Demand(
            total.vcpus + demand.vcpus, total.memory_mb + demand.memory_mb, total.disk_gb + demand.disk_gb
        )
    for node_id, total in taken.items():
        Node.objects.filter(pk=node_id).update(
            allocated_vcpus=F("allocated_vcpus") + total.vcpus,
            allocated_memory_mb=F("allocated_memory_mb") + total.memory_mb,
            allocated_disk_gb=F("allocated_disk_gb") + total.disk_gb,
        )
    return chosen


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
