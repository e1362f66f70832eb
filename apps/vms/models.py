"""Nodes, images, VMs, quotas and batch operations: the fleet's recorded state.

Capacity accounting lives on the node row (``allocated_*``) and is guarded by check constraints, so
the database itself refuses an overcommitted node whatever code path writes it.
"""

import uuid
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models
from django.db.models import F, Q

from apps.projects.services import personal_project
from workers.contract import VXLAN_PORT

from .choices import (
    BatchItemStatus,
    BatchKind,
    BatchStatus,
    ImageFormat,
    ImageKind,
    ImageStatus,
    ImageVisibility,
    NodeStatus,
    VMAction,
    VMState,
)

# Names end up in Celery queue names, file names and QEMU arguments: keep them to a safe alphabet.
name_validator = RegexValidator(
    r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$",
    "Use 1-63 letters, digits, dots, dashes or underscores, starting with a letter or digit.",
)

MAX_VCPUS = 256
MAX_MEMORY_MB = 4 * 1024 * 1024
MAX_DISK_GB = 64 * 1024
# The partial unique index that keeps live VM names unique per project (services report its violations).
VM_NAME_UNIQUE = "vm_name_unique_per_project"


class Node(models.Model):
    name = models.CharField(max_length=63, unique=True, validators=[name_validator])
    address = models.CharField(max_length=255, help_text="Host name or IP address of the node.")
    dwcp_address = models.CharField(max_length=255, help_text="HOST:PORT of the node's DWCP listener.")
    status = models.CharField(max_length=16, choices=NodeStatus.choices, default=NodeStatus.UP)
    status_reason = models.CharField(max_length=500, blank=True)
    vcpus = models.PositiveIntegerField(validators=[MaxValueValidator(100_000)])
    memory_mb = models.PositiveBigIntegerField(validators=[MaxValueValidator(1 << 40)])
    disk_gb = models.PositiveBigIntegerField(validators=[MaxValueValidator(1 << 30)])
    allocated_vcpus = models.PositiveIntegerField(default=0)
    allocated_memory_mb = models.PositiveBigIntegerField(default=0)
    allocated_disk_gb = models.PositiveBigIntegerField(default=0)
    hypervisor = models.JSONField(
        default=dict, blank=True, help_text="QEMU version, accelerator, KVM usability."
    )
    networking = models.CharField(
        max_length=500,
        blank=True,
        default="",
        help_text="Empty when the node can attach NICs (its registration says so), else why it cannot.",
    )
    vxlan_port = models.PositiveIntegerField(
        default=VXLAN_PORT,
        validators=[MinValueValidator(1), MaxValueValidator(65535)],
        help_text="The UDP port of the node's VXLAN devices.",
    )
    last_heartbeat = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        db_table = "nodes"
        ordering = ("name",)
        constraints = [
            models.CheckConstraint(
                condition=Q(allocated_vcpus__lte=F("vcpus")), name="node_vcpus_not_overcommitted"
            ),
            models.CheckConstraint(
                condition=Q(allocated_memory_mb__lte=F("memory_mb")), name="node_memory_not_overcommitted"
            ),
            models.CheckConstraint(
                condition=Q(allocated_disk_gb__lte=F("disk_gb")), name="node_disk_not_overcommitted"
            ),
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def free_vcpus(self) -> int:
        return self.vcpus - self.allocated_vcpus

    @property
    def free_memory_mb(self) -> int:
        return self.memory_mb - self.allocated_memory_mb

    @property
    def free_disk_gb(self) -> int:
        return self.disk_gb - self.allocated_disk_gb

    @property
    def queue(self) -> str:
        return f"node.{self.name}"

    def clean(self) -> None:
        errors = {}
        if self.vcpus is not None and self.allocated_vcpus > self.vcpus:
            errors["vcpus"] = (
                f"{self.allocated_vcpus} vCPUs are allocated on this node; capacity cannot be lower."
            )
        if self.memory_mb is not None and self.allocated_memory_mb > self.memory_mb:
            errors["memory_mb"] = (
                f"{self.allocated_memory_mb} MiB are allocated on this node; capacity cannot be lower."
            )
        if self.disk_gb is not None and self.allocated_disk_gb > self.disk_gb:
            errors["disk_gb"] = (
                f"{self.allocated_disk_gb} GiB are allocated on this node; capacity cannot be lower."
            )
        if errors:
            raise ValidationError(errors)


class Image(models.Model):
    """A boot image. A disk image from the store is addressed by ``sha256`` (nodes cache it by that
    name and ``path`` stays empty); an image registered by ``path`` must exist on every node."""

    name = models.CharField(max_length=63, unique=True, validators=[name_validator])
    project = models.ForeignKey(
        "projects.Project",
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="images",
        help_text="The owning project; empty for the operators' catalog.",
    )
    visibility = models.CharField(
        max_length=8, choices=ImageVisibility.choices, default=ImageVisibility.SHARED
    )
    status = models.CharField(max_length=10, choices=ImageStatus.choices, default=ImageStatus.READY)
    status_reason = models.CharField(max_length=500, blank=True)
    kind = models.CharField(max_length=8, choices=ImageKind.choices, default=ImageKind.DISK)
    format = models.CharField(max_length=8, choices=ImageFormat.choices, default=ImageFormat.QCOW2)
    path = models.CharField(
        max_length=1024, blank=True, help_text="Base disk path on the nodes (disk images not in the store)."
    )
    sha256 = models.CharField(
        max_length=64, blank=True, db_index=True, help_text="Content address of a stored disk image."
    )
    size_bytes = models.PositiveBigIntegerField(default=0)
    virtual_size_bytes = models.PositiveBigIntegerField(default=0)
    checksum = models.CharField(max_length=80, blank=True, help_text="sha256 of the base disk or kernel.")
    kernel_path = models.CharField(max_length=1024, blank=True)
    initrd_path = models.CharField(max_length=1024, blank=True)
    cmdline = models.CharField(max_length=1024, blank=True)
    os_type = models.CharField(max_length=32, blank=True)
    os_version = models.CharField(max_length=32, blank=True)
    min_disk_gb = models.PositiveIntegerField(default=0)
    min_memory_mb = models.PositiveIntegerField(default=0)
    source_url = models.CharField(max_length=2048, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        db_table = "images"
        ordering = ("name",)

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        stored_or_pending = self.sha256 or self.status != ImageStatus.READY
        if self.kind == ImageKind.DISK and not self.path and not stored_or_pending:
            raise ValidationError({"path": "A disk image needs the path of its base disk or a stored file."})
        if self.kind == ImageKind.KERNEL and not self.kernel_path:
            raise ValidationError({"kernel_path": "A kernel image needs kernel_path."})
        for field in ("path", "kernel_path", "initrd_path"):
            value = getattr(self, field)
            if value and (not value.startswith("/") or "\x00" in value or "/../" in f"{value}/"):
                raise ValidationError({field: "Give an absolute path without '..' components."})


def _default_project(row: "VM | BatchOperation") -> None:
    """A VM or batch saved without a project (the shell, the admin, tests) lands in its owner's
    personal project, as the data migration placed every existing one; the services always say."""
    if row.project_id is None and row.owner_id is not None:
        row.project_id = personal_project(row.owner).pk


class VM(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=63, validators=[name_validator])
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.PROTECT,
        related_name="vms",
        db_index=False,
        help_text="Who created the VM.",
    )
    project = models.ForeignKey(
        "projects.Project",
        on_delete=models.PROTECT,
        related_name="vms",
        db_index=False,
        help_text="Who the VM belongs to: its members see and act on it, its quota counts it.",
    )
    node = models.ForeignKey(Node, on_delete=models.PROTECT, related_name="vms", null=True, blank=True)
    image = models.ForeignKey(Image, on_delete=models.PROTECT, related_name="vms")
    state = models.CharField(max_length=16, choices=VMState.choices, default=VMState.PENDING)
    state_reason = models.CharField(
        max_length=1000, blank=True, help_text="Why the VM is in its state (errors)."
    )
    pending_action = models.CharField(
        max_length=8, choices=VMAction.choices, default=VMAction.NONE, blank=True
    )
    vcpus = models.PositiveIntegerField(validators=[MinValueValidator(1), MaxValueValidator(MAX_VCPUS)])
    memory_mb = models.PositiveIntegerField(
        validators=[MinValueValidator(64), MaxValueValidator(MAX_MEMORY_MB)]
    )
    disk_gb = models.PositiveIntegerField(validators=[MinValueValidator(1), MaxValueValidator(MAX_DISK_GB)])
    # cloud-init's NoCloud seed (apps.vms.cloud_init).
    hostname = models.CharField(max_length=253, blank=True)
    ssh_keys = models.JSONField(default=list, blank=True)
    user_data = models.TextField(blank=True, help_text="Never shown back or logged.")
    created_at = models.DateTimeField(auto_now_add=True, db_index=False)
    updated_at = models.DateTimeField(auto_now=True)
    deleted_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "vms"
        verbose_name = "VM"
        ordering = ("-created_at", "-id")
        # Created CONCURRENTLY on PostgreSQL by migration 0002 (the seed report's indexes).
        indexes = [
            models.Index(fields=["state"], name="vms_state_live_idx", condition=~Q(state=VMState.DELETED)),
            # (project, created_at) serves "the project's VMs, newest first" with the API's keyset pagination.
            models.Index(fields=["project", "-created_at"], name="vms_project_created_idx"),
            models.Index(fields=["-created_at"], name="vms_created_idx"),
            # Staff's "what is broken" list (?state=error), newest first: error VMs are few and
            # often old, and without this PostgreSQL walks vms_created_idx past every newer VM.
            models.Index(
                fields=["-created_at", "-id"], name="vms_error_created_idx", condition=Q(state=VMState.ERROR)
            ),
            # A project's usage (quota checks of every create, users/me): count and sums of live VMs by
            # an index-only scan; from the heap, 1,300 VMs cost 3.4 ms (970 pages), from this 0.5 ms.
            models.Index(
                fields=["project"],
                include=["vcpus", "memory_mb"],
                name="vms_project_usage_idx",
                condition=~Q(state=VMState.DELETED),
            ),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=("project", "name"), condition=~Q(state=VMState.DELETED), name=VM_NAME_UNIQUE
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.id})"

    def save(self, *args: Any, **kwargs: Any) -> None:
        _default_project(self)
        super().save(*args, **kwargs)


class BatchOperation(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="batches")
    project = models.ForeignKey("projects.Project", on_delete=models.PROTECT, related_name="batches")
    kind = models.CharField(max_length=8, choices=BatchKind.choices)
    status = models.CharField(max_length=12, choices=BatchStatus.choices, default=BatchStatus.RUNNING)
    total = models.PositiveIntegerField()
    created_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "batch_operations"
        ordering = ("-created_at", "-id")
        indexes = [models.Index(fields=["project", "-created_at"], name="batches_project_created_idx")]

    def __str__(self) -> str:
        return f"{self.kind} batch {self.id}"

    def save(self, *args: Any, **kwargs: Any) -> None:
        _default_project(self)
        super().save(*args, **kwargs)


class BatchItem(models.Model):
    batch = models.ForeignKey(BatchOperation, on_delete=models.CASCADE, related_name="items")
    index = models.PositiveIntegerField()
    vm = models.ForeignKey(VM, on_delete=models.SET_NULL, null=True, related_name="batch_items")
    status = models.CharField(max_length=12, choices=BatchItemStatus.choices, default=BatchItemStatus.PENDING)
    error = models.CharField(max_length=1000, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        db_table = "batch_items"
        ordering = ("batch", "index")
        constraints = [models.UniqueConstraint(fields=("batch", "index"), name="batch_item_index_unique")]

    def __str__(self) -> str:
        return f"item {self.index} of {self.batch_id}"
