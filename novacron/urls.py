"""URL routes: the API under /api/v1/, health probes, admin, /metrics, /dashboard/, VM console pages;
JSON errors for /api/."""

from django.contrib import admin
from django.urls import include, path

from apps.consoles.pages import console_find, console_page
from apps.core.views import healthz, readyz

urlpatterns = [
    path("api/v1/", include("apps.core.urls")),
    path("api-auth/", include("rest_framework.urls")),
    path("healthz", healthz, name="healthz"),
    path("readyz", readyz, name="readyz"),
    path("admin/", admin.site.urls),
    path("vms/console/", console_find, name="vm-console-find"),
    path("vms/<uuid:vm_id>/console/", console_page, name="vm-console-page"),
    path("", include("apps.monitoring.urls")),
]

handler404 = "apps.core.handlers.not_found"
handler500 = "apps.core.handlers.server_error"
handler400 = "apps.core.handlers.bad_request"
handler403 = "apps.core.handlers.permission_denied"
