"""Django admin of images: the catalog's records with their store fields, and which nodes hold each
stored image (read only: the nodes report it). Files are imported through the API or ``manage.py
image_import``, which verify them; the admin edits records, never files."""

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from apps.vms.models import Image

from .models import NodeImage


class NodeImageInline(admin.TabularInline[NodeImage, Image]):
    model = NodeImage
    fields = ("node", "state", "source", "reason", "updated_at")
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Image)
class ImageAdmin(admin.ModelAdmin[Image]):
    list_display = ("name", "project", "visibility", "status", "kind", "format", "size_bytes", "created_at")
    list_filter = ("status", "visibility", "kind", "format")
    list_select_related = ("project",)
    search_fields = ("name", "sha256", "project__name")
    readonly_fields = ("sha256", "size_bytes", "virtual_size_bytes", "status", "status_reason", "created_at")
    fieldsets = (
        (None, {"fields": ("name", "project", "visibility", "kind", "format")}),
        (
            "Store",
            {
                "fields": (
                    "status",
                    "status_reason",
                    "sha256",
                    "size_bytes",
                    "virtual_size_bytes",
                    "source_url",
                )
            },
        ),
        ("Guest", {"fields": ("os_type", "os_version", "min_disk_gb", "min_memory_mb")}),
        ("Registered by path", {"fields": ("path", "checksum", "kernel_path", "initrd_path", "cmdline")}),
        (None, {"fields": ("created_at",)}),
    )
    inlines = (NodeImageInline,)
