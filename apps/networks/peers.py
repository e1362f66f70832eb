"""Overlay peers: which nodes each node's VXLAN devices flood to, sent to the nodes after commit.

A node hosts a network when a VM with a NIC on it is recorded there (``VM.node``, the VM not
deleted) or is the destination of an active migration of such a VM (so the destination and the
others know each other before the RAM moves). Each hosting node is sent ``NODE_NETWORK_PEERS``: for
each network it hosts (by VNI), the other hosting nodes' underlay address and VXLAN port.

Writes that change who hosts what (VM creates, deletes, migrations) call :func:`sync_on_commit` with
the networks (or VMs) concerned; the peers are read once the transaction commits, so they include
it, and a transaction sends one message per affected node however many VMs it touched. A create
syncs only the networks it brings to a node that did not host them (:func:`arrivals`), and a
completed delete only when its node no longer hosts the network: a VM beside others of its network
changes nobody's peers. A node that
registers is sent its complete view (``complete=True``: it drops peers of networks not listed).
Messages are idempotent views, not deltas: a late one is repaired by the next.
"""

import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

from django.db import transaction

from apps.core.db import fetch_prepared, on_postgresql
from apps.vms.choices import VMState
from apps.vms.models import Node
from workers import contract

from .models import Network, Nic

logger = logging.getLogger(__name__)


def _active_migration_statuses() -> list[str]:
    from apps.migrations.choices import ACTIVE_STATUSES  # noqa: PLC0415 - apps.migrations imports apps.vms

    return [str(status) for status in ACTIVE_STATUSES]


def hosting(network_ids: Iterable[int]) -> dict[int, set[int]]:
    """The ids of the nodes hosting each network (see the module's docstring), by network id."""
    ids = list(set(network_ids))
    hosts: dict[int, set[int]] = {pk: set() for pk in ids}
    if not ids:
        return hosts
    live = Nic.objects.filter(network_id__in=ids, vm__node__isnull=False).exclude(vm__state=VMState.DELETED)
    for network_id, node_id in live.values_list("network_id", "vm__node_id").distinct():
        hosts[network_id].add(node_id)
    moving = Nic.objects.filter(network_id__in=ids, vm__migrations__status__in=_active_migration_statuses())
    for network_id, node_id in moving.values_list("network_id", "vm__migrations__dest_node_id").distinct():
        hosts[network_id].add(node_id)
    return hosts


# Which wanted (network, node) pairs the node does not host yet, in one statement: no live NIC of the
# network on a VM recorded on the node, and none on a VM migrating to it. Index look-ups per pair, not
# a scan of the network's NICs. Parameters: the pairs as two arrays, the active migration statuses.
_ARRIVALS_SQL = """
SELECT w.network FROM unnest(%s::bigint[], %s::bigint[]) AS w(network, node)
WHERE NOT EXISTS (
    SELECT 1 FROM nics c JOIN vms v ON v.id = c.vm_id
    WHERE c.network_id = w.network AND v.node_id = w.node AND v.state <> 'deleted'
) AND NOT EXISTS (
    SELECT 1 FROM nics c JOIN migrations m ON m.vm_id = c.vm_id
    WHERE c.network_id = w.network AND m.dest_node_id = w.node AND m.status = ANY(%s::varchar[])
)
"""


def _arrivals_by_orm(wanted: set[tuple[int, int]]) -> set[int]:
    hosts = hosting(network_id for network_id, _ in wanted)
    return {network_id for network_id, node_id in wanted if node_id not in hosts[network_id]}


def arrivals(pairs: Iterable[tuple[int, int]]) -> set[int]:
    """The networks of ``(network, node)`` pairs whose node does not host that network yet: read
    before the VMs that bring them are inserted, under the networks' row locks (creates on one
    network take turns), so of two creates the later one sees the earlier one's VMs."""
    wanted = set(pairs)
    if not wanted:
        return set()
    if not on_postgresql():
        return _arrivals_by_orm(wanted)
    ordered = sorted(wanted)
    rows = fetch_prepared(
        _ARRIVALS_SQL,
        [[network for network, _ in ordered], [node for _, node in ordered], _active_migration_statuses()],
    )
    return {network for (network,) in rows}


def views(network_ids: Iterable[int]) -> dict[str, dict[str, list[contract.OverlayPeer]]]:
    """Each hosting node's peers of ``network_ids`` (by node name, then VNI as text)."""
    hosts = hosting(network_ids)
    node_ids = set().union(*hosts.values()) if hosts else set()
    nodes: dict[int, tuple[str, contract.OverlayPeer]] = {
        pk: (name, {"address": address, "port": port})
        for pk, name, address, port in Node.objects.filter(pk__in=node_ids).values_list(
            "pk", "name", "address", "vxlan_port"
        )
    }
    vnis = dict(Network.objects.filter(pk__in=list(hosts)).values_list("pk", "vni"))
    found: dict[str, dict[str, list[contract.OverlayPeer]]] = {}
    for network_id, members in hosts.items():
        if network_id not in vnis:
            continue  # deleted meanwhile
        for node_id in sorted(members):
            name, _ = nodes[node_id]
            others = [nodes[other][1] for other in sorted(members) if other != node_id]
            found.setdefault(name, {})[str(vnis[network_id])] = others
    return found


def _send(node_name: str, payload: contract.NetworkPeers) -> None:
    from novacron.celery import app  # noqa: PLC0415 - the Celery app imports Django's settings

    app.signature(
        contract.NODE_NETWORK_PEERS, kwargs=payload, queue=contract.node_queue(node_name)
    ).apply_async()


def sync(network_ids: Iterable[int]) -> dict[str, contract.NetworkPeers]:
    """Send every node hosting one of ``network_ids`` its peers of those networks (now); the
    payloads sent, by node name."""
    sent: dict[str, contract.NetworkPeers] = {}
    for node_name, peers in views(network_ids).items():
        payload: contract.NetworkPeers = {"peers": peers, "complete": False}
        _send(node_name, payload)
        sent[node_name] = payload
    return sent


def node_view(node: Node) -> contract.NetworkPeers:
    """Everything ``node`` hosts, with its peers (``complete=True``)."""
    live = Nic.objects.filter(vm__node=node).exclude(vm__state=VMState.DELETED)
    hosted = set(live.values_list("network_id", flat=True))
    hosted |= set(
        Nic.objects.filter(
            vm__migrations__dest_node=node, vm__migrations__status__in=_active_migration_statuses()
        ).values_list("network_id", flat=True)
    )
    return {"peers": views(hosted).get(node.name, {}), "complete": True}


def node_registered(node: Node) -> None:
    """After a node registered (its address or VXLAN port may be new): its complete view to it, and
    the networks it hosts to the other nodes hosting them."""
    view = node_view(node)
    _send(node.name, view)
    vnis = [int(vni) for vni in view["peers"]]
    if vnis:
        others = views(Network.objects.filter(vni__in=vnis).values_list("pk", flat=True))
        for name, peers in others.items():
            if name != node.name:
                _send(name, {"peers": peers, "complete": False})


@dataclass
class _PendingSync:
    """The networks and VMs one transaction changed the hosting of, synced once it commits;
    ``left``: (network, node) pairs a deleted VM held, synced only if the node no longer hosts the
    network (read after the commit: of concurrent deletes, the last to commit sees the node gone)."""

    network_ids: set[int] = field(default_factory=set)
    vm_ids: set[uuid.UUID] = field(default_factory=set)
    left: set[tuple[int, int]] = field(default_factory=set)

    def __call__(self) -> None:
        networks = set(self.network_ids)
        if self.vm_ids:
            networks |= set(
                Nic.objects.filter(vm_id__in=self.vm_ids).order_by().values_list("network_id", flat=True)
            )
        if self.left:
            hosts = hosting(network_id for network_id, _ in self.left)
            networks |= {network_id for network_id, node_id in self.left if node_id not in hosts[network_id]}
        if networks:
            sync(networks)


def _pending() -> _PendingSync:
    """The pending sync of this transaction's current block, registered on commit once (one of an
    enclosing or ended block is left alone: Django drops it with its savepoint if that rolls back,
    and a test's capture of on-commit callbacks runs only those of its own blocks)."""
    connection = transaction.get_connection()
    here = set(connection.savepoint_ids)
    for savepoints, callback, _robust in connection.run_on_commit:
        if isinstance(callback, _PendingSync) and savepoints == here:
            return callback
    pending = _PendingSync()
    transaction.on_commit(pending)
    return pending


def sync_on_commit(
    network_ids: Iterable[int] = (),
    *,
    vm_ids: Iterable[uuid.UUID] = (),
    left: Iterable[tuple[int, int]] = (),
) -> None:
    """Sync the peers of ``network_ids``, of the networks of ``vm_ids`` and of the networks of
    ``left`` (network, node) pairs that node no longer hosts, once the transaction commits (at once
    outside one); one sync per transaction. A batch delete completes VM by VM (one node report
    each): ``left`` keeps it to one sync per node and network, when the node's last VM there went."""
    networks, vms, gone = set(network_ids), set(vm_ids), set(left)
    if not networks and not vms and not gone:
        return
    if not transaction.get_connection().in_atomic_block:
        _PendingSync(networks, vms, gone)()
        return
    pending = _pending()
    pending.network_ids |= networks
    pending.vm_ids |= vms
    pending.left |= gone
