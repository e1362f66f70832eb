"""States and kinds of nodes, images, VMs and batches, as choice classes."""

from django.db import models


class NodeStatus(models.TextChoices):
    UP = "up", "Up"
    DOWN = "down", "Down"
    DRAINING = "draining", "Draining"
    MAINTENANCE = "maintenance", "Maintenance"


class ImageKind(models.TextChoices):
    DISK = "disk", "Disk image"
    KERNEL = "kernel", "Kernel and initramfs"


class ImageFormat(models.TextChoices):
    QCOW2 = "qcow2", "qcow2"
    RAW = "raw", "raw"


class ImageStatus(models.TextChoices):
    PENDING = "pending", "Waiting for its file"
    UPLOADING = "uploading", "Upload in progress"
    IMPORTING = "importing", "Fetching or checking its file"
    READY = "ready", "Ready"
    FAILED = "failed", "Import failed"


class ImageVisibility(models.TextChoices):
    PRIVATE = "private", "Its project only"
    SHARED = "shared", "Every user"


class VMState(models.TextChoices):
    PENDING = "pending", "Pending"
    PROVISIONING = "provisioning", "Provisioning"
    RUNNING = "running", "Running"
    STOPPED = "stopped", "Stopped"
    MIGRATING = "migrating", "Migrating"
    ERROR = "error", "Error"
    DELETING = "deleting", "Deleting"
    DELETED = "deleted", "Deleted"


class VMAction(models.TextChoices):
    """An operation requested of the VM's node and not yet reported back."""

    NONE = "", "None"
    START = "start", "Start"
    STOP = "stop", "Stop"
    REBOOT = "reboot", "Reboot"


class BatchKind(models.TextChoices):
    CREATE = "create", "Create"
    UPDATE = "update", "Update"
    DELETE = "delete", "Delete"


class BatchStatus(models.TextChoices):
    RUNNING = "running", "Running"
    COMPLETED = "completed", "Completed"
    PARTIAL = "partial", "Partially failed"
    FAILED = "failed", "Failed"


class BatchItemStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"


#: States in which a VM holds capacity on its node.
ACTIVE_STATES = frozenset(set(VMState) - {VMState.DELETED})
