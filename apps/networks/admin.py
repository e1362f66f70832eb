"""Django admin of networks and NICs, read only: networks are made, changed and deleted through the
API's services (VNI allocation, overlap and quota checks, the VM answers' cache, the audit trail),
NICs by VM creates and deletes."""

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from .models import Network, Nic


class NicInline(admin.TabularInline[Nic, Network]):
    model = Nic
    fields = ("vm", "index", "mac", "ipv4", "created_at")
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Network)
class NetworkAdmin(admin.ModelAdmin[Network]):
    list_display = ("name", "project", "cidr", "gateway", "vni", "shared", "external", "physical_network")
    list_filter = ("shared", "external")
    list_select_related = ("project",)
    search_fields = ("name", "cidr", "project__name")
    fields = (
        "name",
        "project",
        "cidr",
        "gateway",
        "dns",
        "mtu",
        "vni",
        "shared",
        "external",
        "physical_network",
        "created_at",
        "updated_at",
    )
    readonly_fields = fields
    inlines = (NicInline,)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Nic)
class NicAdmin(admin.ModelAdmin[Nic]):
    list_display = ("mac", "ipv4", "network", "vm", "index", "created_at")
    list_select_related = ("network", "vm")
    search_fields = ("mac", "ipv4", "network__name", "vm__name")
    fields = ("vm", "network", "index", "mac", "ipv4", "created_at")
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
