"""Input and output shapes of the network endpoints, and of a VM's NICs in the VM's answer."""

from typing import Any

from rest_framework import serializers

from apps.core.serializers import StrictInputMixin
from apps.vms.models import name_validator

from .models import DEFAULT_MTU, MAX_DNS, MTU_MAX, MTU_MIN, Network


class NicShownSerializer(serializers.Serializer[Any]):
    """One NIC of a VM, in guest order (the VM's ``nics``)."""

    network = serializers.CharField(help_text="The network's name.")
    mac = serializers.CharField()
    ipv4 = serializers.IPAddressField(protocol="IPv4")


class NetworkSerializer(serializers.ModelSerializer[Network]):
    project = serializers.CharField(source="project.name", read_only=True)

    class Meta:
        model = Network
        fields = (
            "id",
            "name",
            "project",
            "shared",
            "external",
            "physical_network",
            "cidr",
            "gateway",
            "dns",
            "mtu",
            "vni",
            "created_at",
            "updated_at",
        )
        read_only_fields = fields


def _dns_field(**kwargs: Any) -> serializers.ListField:
    return serializers.ListField(
        child=serializers.IPAddressField(protocol="IPv4"),
        max_length=MAX_DNS,
        help_text="DNS servers handed out by DHCP (IPv4).",
        **kwargs,
    )


class NetworkCreateSerializer(StrictInputMixin, serializers.Serializer[Any]):
    name = serializers.CharField(max_length=63, validators=[name_validator])
    cidr = serializers.CharField(
        max_length=18, help_text="An IPv4 network from /16 to /29, e.g. 10.20.0.0/24."
    )
    gateway = serializers.IPAddressField(
        protocol="IPv4", required=False, help_text="A host address of the network; default: its first."
    )
    dns = _dns_field(required=False)
    mtu = serializers.IntegerField(min_value=MTU_MIN, max_value=MTU_MAX, default=DEFAULT_MTU)
    external = serializers.BooleanField(default=False, help_text="Guests reach the outside through NAT.")
    shared = serializers.BooleanField(default=False, help_text="Every project may attach VMs (staff only).")
    physical_network = serializers.CharField(
        max_length=63,
        required=False,
        allow_blank=True,
        validators=[name_validator],
        help_text="Bridge the nodes' interface of this name into the network (staff only).",
    )


class NetworkUpdateSerializer(StrictInputMixin, serializers.Serializer[Any]):
    name = serializers.CharField(max_length=63, validators=[name_validator], required=False)
    dns = _dns_field(required=False)
