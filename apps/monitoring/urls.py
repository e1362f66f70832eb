"""Routes of monitoring: API v1 endpoints (registered on the core router), /metrics and /dashboard/."""

from django.urls import path

from .dashboard import dashboard_data, dashboard_page
from .exposition import metrics_view
from .views import AlertRuleViewSet, AlertViewSet, APILogViewSet, MetricSeriesView

# (prefix, viewset, basename) for apps.core.urls' router.
API_ROUTES = (
    ("api-logs", APILogViewSet, "api-log"),
    ("alert-rules", AlertRuleViewSet, "alert-rule"),
    ("alerts", AlertViewSet, "alert"),
)

api_urlpatterns = [path("metrics/", MetricSeriesView.as_view(), name="metric-series")]

urlpatterns = [
    path("metrics", metrics_view, name="prometheus-metrics"),
    path("dashboard/", dashboard_page, name="dashboard"),
    path("dashboard/data/", dashboard_data, name="dashboard-data"),
]
