"""Tenant networks (a VXLAN overlay with an IPv4 subnet) and the NICs that attach VMs to them.

Invariants kept by the database: a network's name is unique in its project and its ``vni`` in the
fleet; a NIC's MAC is unique in the fleet, its index in its VM and its address in its network. A
NIC goes with its VM's row (CASCADE) or when the VM is deleted (:func:`.services.nics_release`);
a network with NICs cannot be deleted (PROTECT). Addresses and VNIs are handed out by
:mod:`.services` under the locks it documents.
"""

import ipaddress
from typing import Any, Final

from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models

from apps.vms.models import name_validator
from workers.net.names import MAX_NICS

VNI_MIN: Final = 1
VNI_MAX: Final = (1 << 24) - 1  # VXLAN's 24-bit network identifier
# Prefix lengths a network may have: a /16 is 65,534 addresses (IPAM reads a network's taken ones
# under its lock), a /29 the smallest that leaves room for guests beside the gateway.
PREFIX_MIN: Final = 16
PREFIX_MAX: Final = 29
DEFAULT_MTU: Final = 1450  # a 1500-byte underlay minus VXLAN's 50 bytes
MTU_MIN: Final = 576
MTU_MAX: Final = 9000
MAX_DNS: Final = 3  # DHCP clients use at most three name servers (resolv.conf's MAXNS)
DEFAULT_NETWORK: Final = "default"  # the project's network of VMs created without ``networks``
NETWORK_NAME_UNIQUE: Final = "network_name_unique_per_project"


def _ipv4_network(value: str) -> ipaddress.IPv4Network:
    try:
        return ipaddress.IPv4Network(value, strict=True)
    except ValueError as exc:
        raise ValidationError({"cidr": f"{value!r} is not an IPv4 network in CIDR form ({exc})."}) from exc


class Network(models.Model):
    project = models.ForeignKey(
        "projects.Project",
        on_delete=models.PROTECT,
        related_name="networks",
        db_index=False,  # the (project, name) constraint's index serves the project's networks
        help_text="Who owns the network: its members attach VMs to it and its quota counts it.",
    )
    name = models.CharField(max_length=63, validators=[name_validator])
    shared = models.BooleanField(default=False, help_text="Every project may attach VMs (staff only).")
    external = models.BooleanField(
        default=False, help_text="Guests reach the outside through NAT on the node they run on."
    )
    physical_network = models.CharField(
        max_length=63,
        blank=True,
        help_text="A name each node maps to one of its interfaces, bridged into the network (staff only).",
    )
    cidr = models.CharField(max_length=18, help_text="The IPv4 subnet, e.g. 10.20.0.0/24.")
    gateway = models.CharField(max_length=15, help_text="The guests' router, never given to a NIC.")
    dns = models.JSONField(default=list, blank=True, help_text="DNS servers handed out by DHCP.")
    mtu = models.PositiveIntegerField(
        default=DEFAULT_MTU, validators=[MinValueValidator(MTU_MIN), MaxValueValidator(MTU_MAX)]
    )
    vni = models.PositiveIntegerField(
        unique=True,
        validators=[MinValueValidator(VNI_MIN), MaxValueValidator(VNI_MAX)],
        help_text="The VXLAN network identifier, allocated by the control plane.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        db_table = "networks"
        ordering = ("name", "id")
        constraints = [
            models.UniqueConstraint(fields=("project", "name"), name=NETWORK_NAME_UNIQUE),
            models.CheckConstraint(
                condition=models.Q(vni__gte=VNI_MIN, vni__lte=VNI_MAX), name="network_vni_range"
            ),
        ]
        indexes = [
            models.Index(fields=["shared"], name="networks_shared_idx", condition=models.Q(shared=True))
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.cidr)

    def clean(self) -> None:
        """The subnet's size, the gateway inside it and the DNS servers (the API's 400s)."""
        subnet = _ipv4_network(self.cidr)
        if not PREFIX_MIN <= subnet.prefixlen <= PREFIX_MAX:
            raise ValidationError(
                {"cidr": f"Use a prefix from /{PREFIX_MIN} to /{PREFIX_MAX}, not /{subnet.prefixlen}."}
            )
        try:
            gateway = ipaddress.IPv4Address(self.gateway)
        except ValueError as exc:
            raise ValidationError({"gateway": f"{self.gateway!r} is not an IPv4 address."}) from exc
        if gateway not in subnet or gateway in (subnet.network_address, subnet.broadcast_address):
            raise ValidationError(
                {"gateway": f"The gateway must be a host address of {subnet}, not {gateway}."}
            )
        dns: Any = self.dns
        if not isinstance(dns, list) or len(dns) > MAX_DNS:
            raise ValidationError({"dns": f"Give a list of at most {MAX_DNS} IPv4 addresses."})
        for server in dns:
            try:
                ipaddress.IPv4Address(server)
            except (ValueError, TypeError) as exc:
                raise ValidationError({"dns": f"{server!r} is not an IPv4 address."}) from exc


class Nic(models.Model):
    vm = models.ForeignKey("vms.VM", on_delete=models.CASCADE, related_name="nics", db_index=False)
    network = models.ForeignKey(Network, on_delete=models.PROTECT, related_name="nics", db_index=False)
    index = models.PositiveSmallIntegerField(
        validators=[MaxValueValidator(MAX_NICS - 1)], help_text="The NIC's place in the guest (0 first)."
    )
    mac = models.CharField(max_length=17, unique=True, help_text="Lower case, colon-separated.")
    ipv4 = models.CharField(max_length=15, help_text="The NIC's address in its network.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        db_table = "nics"
        verbose_name = "NIC"
        ordering = ("vm", "index")
        constraints = [
            # Also the index of "a VM's NICs in order" (the representation's subquery).
            models.UniqueConstraint(fields=("vm", "index"), name="nic_index_unique_per_vm"),
            # Also the index of "a network's addresses" (IPAM) and "is the network in use".
            models.UniqueConstraint(fields=("network", "ipv4"), name="nic_ipv4_unique_per_network"),
            models.CheckConstraint(condition=models.Q(index__lt=MAX_NICS), name="nic_index_range"),
        ]

    def __str__(self) -> str:
        return f"{self.mac} {self.ipv4}"
