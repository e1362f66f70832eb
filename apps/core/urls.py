"""Routes of the API v1: every app's endpoints under one router."""

from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.routers import DefaultRouter

from apps.accounts.urls import API_ROUTES as ACCOUNTS_ROUTES
from apps.accounts.urls import api_urlpatterns as accounts_urlpatterns
from apps.audit.urls import API_ROUTES as AUDIT_ROUTES
from apps.images.views import ImageViewSet
from apps.migrations.views import MigrationViewSet
from apps.monitoring.urls import API_ROUTES as MONITORING_ROUTES
from apps.monitoring.urls import api_urlpatterns as monitoring_urlpatterns
from apps.networks.views import NetworkViewSet
from apps.projects.views import ProjectMemberViewSet, ProjectViewSet
from apps.vms.views import BatchViewSet, MeView, NodeViewSet, VMViewSet

router = DefaultRouter()
router.register("vms", VMViewSet, basename="vm")
router.register("batches", BatchViewSet, basename="batch")
router.register("nodes", NodeViewSet, basename="node")
router.register("images", ImageViewSet, basename="image")
router.register("migrations", MigrationViewSet, basename="migration")
router.register("networks", NetworkViewSet, basename="network")
router.register("projects", ProjectViewSet, basename="project")
router.register(r"projects/(?P<id>[0-9]+)/members", ProjectMemberViewSet, basename="project-member")
for prefix, viewset, basename in (*ACCOUNTS_ROUTES, *MONITORING_ROUTES, *AUDIT_ROUTES):
    router.register(prefix, viewset, basename=basename)

urlpatterns = [
    *accounts_urlpatterns,
    path("users/me/", MeView.as_view(), name="me"),  # before the router's users/{id}/
    path("schema/", SpectacularAPIView.as_view(), name="schema"),
    path("docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="docs"),
    *monitoring_urlpatterns,
    path("", include("apps.migrations.urls")),
    path("", include(router.urls)),
]
