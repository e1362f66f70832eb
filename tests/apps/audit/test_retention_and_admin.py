"""The retention deletes only events older than AUDIT_RETENTION_DAYS; the admin lists events read-only."""

from datetime import timedelta
from typing import Any

import pytest
from django.conf import settings
from django.utils import timezone

from apps.audit import tasks
from apps.audit.choices import AuditAction
from apps.audit.models import AuditEvent
from apps.audit.services import PRUNE_BATCH, audit_prune, audit_record
from apps.projects.models import Project
from apps.projects.services import personal_project

pytestmark = pytest.mark.django_db


def _events_aged(days: float, count: int, *, actor: Any = None, project: Project | None = None) -> None:
    for _ in range(count):
        event = audit_record(
            action=AuditAction.VM_DELETE,
            actor_id=actor.pk if actor else None,
            project_id=project.pk if project else None,
            target_id=f"aged-{days}",
            request_id="",
            status=202,
            detail={},
        )
        AuditEvent.objects.filter(pk=event.pk).update(timestamp=timezone.now() - timedelta(days=days))


def test_the_retention_deletes_only_events_older_than_the_setting(settings):
    settings.NOVACRON = settings.NOVACRON | {"AUDIT_RETENTION_DAYS": 30}
    _events_aged(31, 3)
    _events_aged(29, 2)
    _events_aged(0, 1)
    assert tasks.audit_prune() == 3
    assert sorted(AuditEvent.objects.values_list("target_id", flat=True)) == ["aged-0", "aged-29", "aged-29"]
    assert audit_prune(days=0) == 3
    assert audit_prune() == 0


def test_the_default_retention_is_a_year_and_beat_runs_it():
    assert settings.NOVACRON["AUDIT_RETENTION_DAYS"] == 365
    assert {entry["task"] for entry in settings.CELERY_BEAT_SCHEDULE.values()} >= {
        "apps.audit.tasks.audit_prune"
    }
    assert PRUNE_BATCH >= 1000


def test_the_admin_lists_filters_and_searches_events_but_never_edits_them(client, staff, user):
    project = Project.objects.create(name="red", **Project.default_quota())
    personal_project(staff)  # not offered by the project filter (one per user)
    _events_aged(0, 1, actor=user, project=project)
    _events_aged(1, 1)
    client.force_login(staff)
    base = "/admin/audit/auditevent/"
    page = client.get(base)
    assert page.context["cl"].result_count == 2
    assert ">red</a>" in page.content.decode() and "~operator" not in page.content.decode()
    for query in (
        f"?project={project.pk}",
        "?action__exact=vm.delete&outcome__exact=ok&q=alice",
        "?q=aged-1",
    ):
        response = client.get(base + query)
        assert response.status_code == 200, query
        assert response.context["cl"].result_count == 1, query
    event = AuditEvent.objects.first()
    assert client.get(f"{base}add/").status_code == 403
    assert client.post(f"{base}{event.pk}/delete/").status_code == 403
    assert client.post(f"{base}{event.pk}/change/", {"action": "vm.create"}).status_code == 403
    assert AuditEvent.objects.count() == 2
