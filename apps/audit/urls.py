"""Routes of the audit trail: API v1 endpoints, registered on the core router."""

from .views import AuditEventViewSet

# (prefix, viewset, basename) for apps.core.urls' router.
API_ROUTES = (("audit", AuditEventViewSet, "audit-event"),)
