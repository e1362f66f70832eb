"""Reads of networks and NICs, through the caller's tenancy: a viewer sees the networks of the
project they act in and the shared ones; staff naming no project see all (the VMs' rule,
:func:`apps.vms.selectors.visible_project`, plus shared networks). A VM's NICs are read in index
order with their networks, one query for any number of VMs (:data:`NICS_PREFETCH`)."""

from collections.abc import Sequence

from django.db.models import Prefetch, Q, QuerySet

from apps.core.context import Viewer
from apps.vms.models import VM
from apps.vms.selectors import visible_project
from workers import contract

from .models import Network, Nic


def network_visible_to(viewer: Viewer) -> QuerySet[Network]:
    """Every network ``viewer`` sees, with its project's name."""
    networks = Network.objects.select_related("project")
    project = visible_project(viewer)
    return networks if project is None else networks.filter(Q(project_id=project) | Q(shared=True))


#: A VM's NICs in index order with their networks (``prefetch_related``): one query per page of VMs.
NICS_PREFETCH = Prefetch("nics", queryset=Nic.objects.select_related("network").order_by("index"))


def vm_nics(vm: VM) -> Sequence[Nic]:
    """The VM's NICs in index order (prefetched with :data:`NICS_PREFETCH`, else read now)."""
    if "nics" in getattr(vm, "_prefetched_objects_cache", {}):
        return list(vm.nics.all())
    return list(Nic.objects.filter(vm_id=vm.pk).select_related("network").order_by("index"))


def network_description(network: Network) -> contract.NetworkDescription:
    """A network as a node builds it (``contract.NetworkDescription``)."""
    return {
        "id": str(network.pk),
        "name": network.name,
        "vni": network.vni,
        "cidr": network.cidr,
        "gateway": network.gateway,
        "dns": list(network.dns),
        "mtu": network.mtu,
        "external": network.external,
        "physical_network": network.physical_network,
    }


def nic_descriptions(vm: VM) -> list[contract.NicDescription]:
    """The VM's NICs as a node attaches them, in guest order."""
    return [
        {"mac": nic.mac, "ipv4": nic.ipv4, "network": network_description(nic.network)} for nic in vm_nics(vm)
    ]


def nics_shown(vm: VM) -> list[dict[str, str]]:
    """The VM's NICs as its API answer shows them (:mod:`apps.vms.representation`'s ``nics``)."""
    return [{"network": nic.network.name, "mac": nic.mac, "ipv4": nic.ipv4} for nic in vm_nics(vm)]
