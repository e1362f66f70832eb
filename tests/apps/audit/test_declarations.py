"""What an endpoint declares: handler-keyed actions, the project of a view under a project, an
unanswered exception recorded as failed (views of this test, declared as an endpoint would)."""

from typing import Any

import pytest
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.test import APIRequestFactory, force_authenticate

from apps.audit.choices import ACTION_PREFIXES, AuditAction
from apps.audit.models import AuditEvent
from apps.audit.recording import AuditedView, model_writes
from apps.projects.models import Project

pytestmark = pytest.mark.django_db


class QuotaLikeView(AuditedView):
    """A view under a project (``/projects/{project_pk}/...``), as the projects API declares one."""

    audit_actions = {"put": AuditAction.QUOTA_UPDATE, "post": AuditAction.PROJECT_CREATE}
    audit_fields = ("max_vms",)
    audit_project_kwarg = "project_pk"

    def put(self, request: Request, project_pk: str) -> Response:
        return Response({"max_vms": request.data.get("max_vms")})

    def post(self, request: Request) -> Response:
        project = Project.objects.create(name="made", **Project.default_quota())
        return Response({"id": project.pk, "name": project.name}, status=201)

    def get(self, request: Request, project_pk: str) -> Response:
        return Response({})


class ExplodingView(AuditedView):
    audit_actions = {"post": AuditAction.NODE_DRAIN}

    def post(self, request: Request, pk: str) -> Response:
        raise RuntimeError("no handler answers this")


def _call(view: Any, method: str, user: Any, body: dict[str, Any] | None = None, **kwargs: str) -> Any:
    request = getattr(APIRequestFactory(), method)("/", body or {}, format="json")
    force_authenticate(request, user=user)
    return view.as_view()(request, **kwargs)


def test_a_view_under_a_project_records_the_urls_project_and_a_create_the_one_it_made(staff):
    project = Project.objects.create(name="team", **Project.default_quota())
    assert (
        _call(
            QuotaLikeView, "put", staff, {"max_vms": 7, "secret": "x"}, project_pk=str(project.pk)
        ).status_code
        == 200
    )
    event = AuditEvent.objects.get()
    assert (event.action, event.target_type, event.project_id, event.project_name) == (
        "quota.update",
        "quota",
        project.pk,
        "team",
    )
    assert event.detail == {"fields": ["max_vms", "secret"], "values": {"max_vms": 7}}
    assert event.request_id == ""  # no monitoring middleware in front of a bare view
    AuditEvent.objects.all().delete()
    made = _call(QuotaLikeView, "post", staff).data["id"]
    event = AuditEvent.objects.get()
    assert (event.action, event.target_id, event.project_id, event.project_name) == (
        "project.create",
        str(made),
        made,
        "made",
    )
    AuditEvent.objects.all().delete()
    assert _call(QuotaLikeView, "get", staff, project_pk=str(project.pk)).status_code == 200
    assert not AuditEvent.objects.exists()


def test_an_exception_no_handler_answers_is_recorded_as_failed_and_raised(staff):
    with pytest.raises(RuntimeError):
        _call(ExplodingView, "post", staff, pk="7")
    event = AuditEvent.objects.get()
    assert (event.action, event.target_id, event.status, event.outcome, event.actor_id) == (
        "node.drain",
        "7",
        500,
        "failed",
        staff.pk,
    )


def test_model_writes_declares_a_viewsets_create_update_and_delete():
    assert model_writes("image") == {
        "create": AuditAction.IMAGE_CREATE,
        "update": AuditAction.IMAGE_UPDATE,
        "partial_update": AuditAction.IMAGE_UPDATE,
        "destroy": AuditAction.IMAGE_DELETE,
    }
    with pytest.raises(ValueError, match=r"quota\.create"):
        model_writes("quota")
    assert {"vm.", "member.", "quota.", "alert_rule."} <= ACTION_PREFIXES
