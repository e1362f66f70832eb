"""Routes of accounts: ``auth/token/`` and the viewsets registered on ``apps.core.urls``' router."""

from django.urls import path

from .views import TokenView, TokenViewSet, UserViewSet

# (prefix, viewset, basename) for apps.core.urls' router.
API_ROUTES = (
    ("tokens", TokenViewSet, "api-token"),
    ("users", UserViewSet, "user"),
)

api_urlpatterns = [path("auth/token/", TokenView.as_view(), name="token")]
