"""Modes, statuses and phases of a VM migration."""

from django.db import models


class MigrationMode(models.TextChoices):
    LIVE = "live", "Live"
    COLD = "cold", "Cold"


class MigrationStatus(models.TextChoices):
    QUEUED = "queued", "Queued"
    PREPARING = "preparing", "Preparing"
    TRANSFERRING = "transferring", "Transferring"
    SWITCHING = "switching", "Switching"
    COMPLETED = "completed", "Completed"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"


class MigrationPhase(models.TextChoices):
    NONE = "", "None"
    IMAGE = "image", "Fetching the base image"
    DISK = "disk", "Disk"
    MEMORY = "memory", "Memory"


class OnNoConvergence(models.TextChoices):
    """What happens when the source's forecast says a live migration's pre-copy does not converge."""

    KEEP = "keep", "Keep trying (auto-converge throttles the guest)"
    FORCE_COMPLETE_AFTER = "force_complete_after", "Force-complete after N passes"
    CANCEL = "cancel", "Cancel (the VM stays on its source)"


# Under way on the nodes; a migration that is not under way is queued or ended.
RUNNING_STATUSES = frozenset(
    {MigrationStatus.PREPARING, MigrationStatus.TRANSFERRING, MigrationStatus.SWITCHING}
)
ACTIVE_STATUSES = frozenset({MigrationStatus.QUEUED, *RUNNING_STATUSES})
TERMINAL_STATUSES = frozenset({MigrationStatus.COMPLETED, MigrationStatus.FAILED, MigrationStatus.CANCELLED})
