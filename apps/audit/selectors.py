"""Reads of the audit trail: who may see which events (one rule, used by every read)."""

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db.models import QuerySet

from apps.projects.models import Membership, Role

from .models import AuditEvent


def audit_visible(*, user: AbstractBaseUser | AnonymousUser) -> QuerySet[AuditEvent]:
    """Staff see every event; anyone else the events of the projects they admin (none when they
    admin none: events without a project are staff's alone)."""
    if not user.is_authenticated:
        return AuditEvent.objects.none()
    if getattr(user, "is_staff", False):
        return AuditEvent.objects.all()
    administered = Membership.objects.filter(user_id=user.pk, role=Role.ADMIN).values("project_id")
    return AuditEvent.objects.filter(project_id__in=administered)
