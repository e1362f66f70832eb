"""A VM migration request and its recorded outcome."""

import uuid

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Q

from apps.vms.models import VM, Node
from workers import contract

from .choices import ACTIVE_STATUSES, MigrationMode, MigrationPhase, MigrationStatus, OnNoConvergence


class Migration(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    vm = models.ForeignKey(VM, on_delete=models.CASCADE, related_name="migrations")
    source_node = models.ForeignKey(
        Node, on_delete=models.PROTECT, related_name="outgoing_migrations", db_index=False
    )
    dest_node = models.ForeignKey(Node, on_delete=models.PROTECT, related_name="incoming_migrations")
    mode = models.CharField(max_length=8, choices=MigrationMode.choices, default=MigrationMode.LIVE)
    status = models.CharField(max_length=16, choices=MigrationStatus.choices, default=MigrationStatus.QUEUED)
    phase = models.CharField(
        max_length=8, choices=MigrationPhase.choices, default=MigrationPhase.NONE, blank=True
    )
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, related_name="requested_migrations"
    )
    bandwidth_limit_mbps = models.PositiveIntegerField(null=True, blank=True)
    on_no_convergence = models.CharField(
        max_length=24,
        choices=OnNoConvergence.choices,
        default=OnNoConvergence.KEEP,
        help_text="Live: what a 'no' convergence verdict of the source's forecast leads to.",
    )
    force_complete_after_passes = models.PositiveSmallIntegerField(
        null=True, blank=True, help_text="With force_complete_after: the RAM pass from which to force."
    )
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    error = models.TextField(blank=True)
    error_cause = models.CharField(
        max_length=8,
        blank=True,
        choices=[(cause, cause) for cause in contract.FAILURE_CAUSES],
        help_text="How first-hand the error is: a better-ranked report of the same failure replaces it.",
    )
    stats = models.JSONField(
        default=dict, blank=True, help_text="Final statistics: bytes, downtime, durations."
    )
    percent = models.FloatField(default=0.0, help_text="Progress 0-100; never decreases.")
    vm_state_before = models.CharField(
        max_length=16, blank=True, help_text="VM state to return to on failure."
    )
    cancel_requested = models.BooleanField(default=False)
    last_progress_at = models.DateTimeField(null=True, blank=True, help_text="For the stall watchdog.")
    dest_unknown_since = models.DateTimeField(
        null=True,
        blank=True,
        help_text="Since when the watchdog cannot tell whether the destination runs the VM (switching).",
    )
    needs_operator = models.BooleanField(
        default=False, help_text="Automation will not decide this migration's outcome: an operator must."
    )
    attention = models.TextField(blank=True, help_text="Why an operator must decide, and what is known.")

    class Meta:
        db_table = "migrations"
        ordering = ("-created_at", "-id")
        indexes = [
            models.Index(fields=["status"], name="migrations_status_idx"),
            models.Index(fields=["source_node", "dest_node"], name="migrations_nodes_idx"),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=("vm",),
                condition=Q(status__in=sorted(ACTIVE_STATUSES)),
                name="one_active_migration_per_vm",
            ),
            models.CheckConstraint(
                condition=~Q(source_node=models.F("dest_node")), name="migration_nodes_differ"
            ),
        ]

    def __str__(self) -> str:
        return f"migration {self.id} of {self.vm_id}"

    def clean(self) -> None:
        if (
            self.on_no_convergence == OnNoConvergence.FORCE_COMPLETE_AFTER
            and not self.force_complete_after_passes
        ):
            raise ValidationError(
                {"force_complete_after_passes": "force_complete_after needs a number of passes (1 or more)."}
            )


class MigrationEvent(models.Model):
    """One transition of a migration: the audit trail (who, when, from, to, why)."""

    migration = models.ForeignKey(Migration, on_delete=models.CASCADE, related_name="events")
    at = models.DateTimeField(auto_now_add=True)
    actor = models.CharField(max_length=150, help_text="A username, a node name, or 'system'.")
    from_status = models.CharField(max_length=16, choices=MigrationStatus.choices, blank=True)
    to_status = models.CharField(max_length=16, choices=MigrationStatus.choices)
    phase = models.CharField(max_length=8, choices=MigrationPhase.choices, blank=True)
    detail = models.TextField(blank=True)

    class Meta:
        db_table = "migration_events"
        ordering = ("at", "id")

    def __str__(self) -> str:
        return f"{self.migration_id}: {self.from_status} -> {self.to_status}"
