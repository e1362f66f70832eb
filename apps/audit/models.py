"""Audit events: who did what to which object, in which project, and how it ended.

Invariants: an event references nothing by foreign key, so it outlives the user, project and object
it names; it copies the actor's username and the project's name as they were when it was written.
``detail`` never holds a secret (a password, a token, user data): it is made only by
:mod:`.recording`, which keeps the values of the fields a view declares and the names of the others.
Rows are written once and never changed; the retention deletes them (``AUDIT_RETENTION_DAYS``).
"""

from django.db import models
from django.utils import timezone

from .choices import AuditAction, Outcome

# Longest target id kept: a UUID is 36 characters; a URL may carry longer junk, which is cut.
TARGET_ID_MAX = 64


class AuditEvent(models.Model):
    timestamp = models.DateTimeField(default=timezone.now)
    actor_id = models.BigIntegerField(
        null=True, blank=True, help_text="The user's id; empty: the system or anonymous."
    )
    actor_name = models.CharField(max_length=150, blank=True, help_text="The actor's username when it acted.")
    project_id = models.BigIntegerField(null=True, blank=True, help_text="The project acted in, if any.")
    project_name = models.CharField(max_length=64, blank=True, help_text="The project's name at the time.")
    action = models.CharField(max_length=32, choices=AuditAction.choices)
    target_type = models.CharField(max_length=16)
    target_id = models.CharField(max_length=TARGET_ID_MAX, blank=True)
    request_id = models.CharField(max_length=64, blank=True)
    status = models.PositiveSmallIntegerField(help_text="The HTTP status of the answer.")
    outcome = models.CharField(max_length=8, choices=Outcome.choices)
    detail = models.JSONField(default=dict, blank=True)

    class Meta:
        db_table = "audit_events"
        ordering = ("-timestamp", "-id")
        indexes = [
            models.Index(fields=["-timestamp"], name="audit_events_timestamp_idx"),
            models.Index(fields=["project_id", "-timestamp"], name="audit_events_project_idx"),
            models.Index(fields=["target_id", "-timestamp"], name="audit_events_target_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.actor_name or 'system'} {self.action} {self.target_id} ({self.outcome})"
