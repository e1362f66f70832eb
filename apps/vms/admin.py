"""Django admin for the fleet: VMs (with lifecycle actions, each VM's in the audit trail, and a link
to the VM's console page), nodes and batches (projects, their members and quotas:
``apps.projects.admin``; images: ``apps.images.admin``)."""

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.html import format_html

from apps.audit.choices import AuditAction
from apps.audit.services import audit_admin
from apps.consoles.pages import console_path
from apps.core.auth import request_user
from apps.core.errors import NovaCronError
from apps.migrations.choices import MigrationMode
from apps.migrations.services import migration_request

from . import representation, services
from .choices import VMAction, VMState
from .models import VM, BatchItem, BatchOperation, Node


def _each(
    modeladmin: admin.ModelAdmin[VM],
    request: HttpRequest,
    queryset: QuerySet[VM],
    verb: str,
    call: object,
    *,
    action: AuditAction,
) -> None:
    """``call`` each VM, each call in the audit trail as ``action`` (refusals with their status)."""
    done, failed = 0, []
    for vm in queryset:
        try:
            call(vm)  # type: ignore[operator]
            done += 1
            audit_admin(request, action, target_id=vm.pk, project_id=vm.project_id)
        except NovaCronError as exc:
            failed.append(f"{vm.name}: {exc.message}")
            detail = {"error": exc.code}
            audit_admin(
                request, action, target_id=vm.pk, project_id=vm.project_id, status=exc.status, detail=detail
            )
    if done:
        modeladmin.message_user(request, f"{verb} requested for {done} VM(s).", messages.SUCCESS)
    for line in failed:
        modeladmin.message_user(request, line, messages.ERROR)


@admin.register(VM)
class VMAdmin(admin.ModelAdmin[VM]):
    list_display = (
        "name",
        "state",
        "node",
        "project",
        "owner",
        "image",
        "vcpus",
        "memory_mb",
        "disk_gb",
        "created_at",
    )
    list_filter = ("state", "node", "image")
    search_fields = ("name", "id", "owner__username", "project__name")
    list_select_related = representation.relations()
    readonly_fields = (
        "id",
        "console",
        "project",
        "owner",
        "node",
        "state",
        "state_reason",
        "pending_action",
        "hostname",
        "ssh_keys",
        "created_at",
        "updated_at",
        "deleted_at",
    )
    fields = (
        "id",
        "console",
        "name",
        "project",
        "owner",
        "image",
        "node",
        "state",
        "state_reason",
        "pending_action",
        "vcpus",
        "memory_mb",
        "disk_gb",
        "hostname",
        "ssh_keys",  # user data is never shown, here neither
        "created_at",
        "updated_at",
        "deleted_at",
    )
    actions = ("start_vms", "stop_vms", "reboot_vms", "live_migrate_vms", "delete_vms")
    show_full_result_count = False

    @admin.display(description="Console")
    def console(self, vm: VM) -> str:
        if vm.state == VMState.DELETED:
            return "none (the VM is deleted)"
        return format_html('<a class="button" href="{}">Open the console</a>', console_path(vm.pk))

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # VMs are created through the API, which places them and reserves capacity

    def has_delete_permission(self, request: HttpRequest, obj: VM | None = None) -> bool:
        return False  # deletion goes through the node: use the "Delete" action

    @admin.action(description="Start selected VMs")
    def start_vms(self, request: HttpRequest, queryset: QuerySet[VM]) -> None:
        _each(
            self,
            request,
            queryset,
            "Start",
            lambda vm: services.vm_request_action(vm=vm, action=VMAction.START),
            action=AuditAction.VM_START,
        )

    @admin.action(description="Stop selected VMs")
    def stop_vms(self, request: HttpRequest, queryset: QuerySet[VM]) -> None:
        _each(
            self,
            request,
            queryset,
            "Stop",
            lambda vm: services.vm_request_action(vm=vm, action=VMAction.STOP),
            action=AuditAction.VM_STOP,
        )

    @admin.action(description="Reboot selected VMs")
    def reboot_vms(self, request: HttpRequest, queryset: QuerySet[VM]) -> None:
        _each(
            self,
            request,
            queryset,
            "Reboot",
            lambda vm: services.vm_request_action(vm=vm, action=VMAction.REBOOT),
            action=AuditAction.VM_REBOOT,
        )

    @admin.action(description="Live-migrate selected VMs (scheduler picks the destination)")
    def live_migrate_vms(self, request: HttpRequest, queryset: QuerySet[VM]) -> None:
        _each(
            self,
            request,
            queryset,
            "Migration",
            lambda vm: migration_request(vm=vm, requested_by=request_user(request), mode=MigrationMode.LIVE),
            action=AuditAction.VM_MIGRATE,
        )

    @admin.action(description="Delete selected VMs (through their nodes)")
    def delete_vms(self, request: HttpRequest, queryset: QuerySet[VM]) -> None:
        _each(
            self,
            request,
            queryset,
            "Deletion",
            lambda vm: services.vm_delete(vm=vm),
            action=AuditAction.VM_DELETE,
        )


@admin.register(Node)
class NodeAdmin(admin.ModelAdmin[Node]):
    list_display = (
        "name",
        "status",
        "address",
        "dwcp_address",
        "allocated_vcpus",
        "vcpus",
        "allocated_memory_mb",
        "memory_mb",
        "allocated_disk_gb",
        "disk_gb",
        "last_heartbeat",
    )
    list_filter = ("status",)
    search_fields = ("name", "address")
    readonly_fields = (
        "allocated_vcpus",
        "allocated_memory_mb",
        "allocated_disk_gb",
        "hypervisor",
        "last_heartbeat",
    )


class BatchItemInline(admin.TabularInline[BatchItem, BatchOperation]):
    model = BatchItem
    fields = ("index", "vm", "status", "error", "updated_at")
    readonly_fields = fields
    extra = 0
    can_delete = False


@admin.register(BatchOperation)
class BatchOperationAdmin(admin.ModelAdmin[BatchOperation]):
    list_display = ("id", "kind", "status", "project", "owner", "total", "created_at", "finished_at")
    list_filter = ("kind", "status")
    readonly_fields = ("id", "project", "owner", "kind", "status", "total", "created_at", "finished_at")
    inlines = (BatchItemInline,)
