"""A VM's NICs as its API answer shows them and as a node attaches them.

Read in index order with their networks: one query for any number of VMs when prefetched with
:data:`NICS_PREFETCH` (a page, a batch), else one per VM. Imports only models (``apps.vms``'s
representation, selectors and dispatch import this module).
"""

from collections.abc import Sequence
from typing import Any, Final

from django.db.models import Prefetch

from workers import contract

from .models import Network, Nic

#: A VM's NICs in index order with their networks (``prefetch_related``): one query per page of VMs.
NICS_PREFETCH = Prefetch("nics", queryset=Nic.objects.select_related("network").order_by("index"))


# Where a VM instance keeps the NICs its create just wrote (with their networks), so its answer and
# its node task read them from memory.
_WRITTEN: Final = "_novacron_written_nics"


def keep_written(vm: Any, nics: Sequence[Nic]) -> None:
    """Remember on ``vm`` the NICs just written for it, in index order, their networks loaded."""
    vm.__dict__[_WRITTEN] = sorted(nics, key=lambda nic: nic.index)


def vm_nics(vm: Any) -> Sequence[Nic]:
    """The VM's NICs in index order (just written, or prefetched with :data:`NICS_PREFETCH`, else read
    now)."""
    if _WRITTEN in vm.__dict__:
        return list(vm.__dict__[_WRITTEN])
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


def nic_descriptions(vm: Any) -> list[contract.NicDescription]:
    """The VM's NICs as a node attaches them, in guest order."""
    return [
        {"mac": nic.mac, "ipv4": nic.ipv4, "network": network_description(nic.network)} for nic in vm_nics(vm)
    ]


def nics_shown(vm: Any) -> list[dict[str, str]]:
    """The VM's NICs as its API answer shows them (:mod:`apps.vms.representation`'s ``nics``)."""
    return [{"network": nic.network.name, "mac": nic.mac, "ipv4": nic.ipv4} for nic in vm_nics(vm)]
