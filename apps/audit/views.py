"""The audit trail's endpoint: ``GET /api/v1/audit/``, newest first, filtered, cursor-paginated.

Who sees what is :func:`.selectors.audit_visible`: staff every event, a project admin their projects'
events; anyone else an empty list (not 403: like every list, it shows what the caller may see).
"""

from django.db.models import QuerySet
from rest_framework import mixins, viewsets

from apps.core.pagination import TimestampCursorPagination

from .filters import AuditEventFilter
from .models import AuditEvent
from .selectors import audit_visible
from .serializers import AuditEventSerializer


class AuditEventViewSet(mixins.ListModelMixin, viewsets.GenericViewSet[AuditEvent]):
    """Audit events, newest first: staff see all, a project admin their projects' events.

    Filters: ``project`` (id), ``actor`` (id or username), ``action`` (``vm.create``, or a prefix
    such as ``vm.``), ``target`` (id), ``outcome`` (``ok``, ``refused``, ``failed``), ``since`` and
    ``until`` (ISO 8601).
    """

    serializer_class = AuditEventSerializer
    pagination_class = TimestampCursorPagination
    filterset_class = AuditEventFilter

    def get_queryset(self) -> QuerySet[AuditEvent]:
        return audit_visible(user=self.request.user)
