"""Node records: registration by node workers, removal by staff."""

from typing import Any

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from apps.core.conf import novacron_setting
from apps.core.errors import Conflict
from apps.networks import peers
from apps.vms import cache as vm_cache
from apps.vms.choices import NodeStatus, VMState
from apps.vms.models import VM, Node
from workers import contract

NETWORKING_NOT_REPORTED = "its node worker did not say whether it can attach NICs (an older version)"


@transaction.atomic
def node_register(
    *,
    name: str,
    address: str,
    dwcp_address: str,
    vcpus: int,
    memory_mb: int,
    disk_gb: int,
    hypervisor: dict[str, Any],
    vxlan_port: int = contract.VXLAN_PORT,
    networking: str = NETWORKING_NOT_REPORTED,
) -> Node:
    """Create or refresh a node from its worker's registration; a node coming back is ``up`` again.

    Capacity is what the host has times the allocation ratios (vCPUs are overcommitted as in Nova),
    never below what is already allocated: a host that shrank refuses new VMs rather than failing.
    ``networking`` is "" when the node can attach NICs (else why not: VMs with NICs go elsewhere);
    a worker that does not say (an older one) cannot. After commit the node is sent its overlay
    peers (:func:`apps.networks.peers.node_registered`).
    """
    node = Node.objects.select_for_update().filter(name=name).first()
    if node is None:
        node = Node(name=name)
    node.address, node.dwcp_address = address, dwcp_address
    node.vcpus = max(int(vcpus * novacron_setting("CPU_ALLOCATION_RATIO")), node.allocated_vcpus)
    node.memory_mb = max(int(memory_mb * novacron_setting("RAM_ALLOCATION_RATIO")), node.allocated_memory_mb)
    node.disk_gb = max(disk_gb, node.allocated_disk_gb)
    node.hypervisor = hypervisor
    node.vxlan_port, node.networking = vxlan_port, networking[:500]
    node.last_heartbeat = timezone.now()
    if node.status == NodeStatus.DOWN or node._state.adding:
        node.status, node.status_reason = NodeStatus.UP, ""
    node.full_clean()
    node.save()
    transaction.on_commit(lambda: peers.node_registered(node))
    return node


@transaction.atomic
def node_delete(*, node: Node) -> None:
    """Forget a node that holds no live VM (deleted VMs keep their history without it)."""
    node = Node.objects.select_for_update().get(pk=node.pk)
    live = VM.objects.filter(node=node).exclude(state=VMState.DELETED).count()
    if live:
        raise Conflict(f"Node {node.name} still holds {live} VM(s); migrate or delete them first.")
    from apps.migrations.models import Migration  # noqa: PLC0415 - migrations depend on vms

    if Migration.objects.filter(Q(source_node=node) | Q(dest_node=node)).exists():
        raise Conflict(f"Node {node.name} appears in migration records; set it to maintenance instead.")
    VM.objects.filter(node=node).update(node=None)
    node.delete()
    vm_cache.fleet_changed()  # deleted VMs showed its name
