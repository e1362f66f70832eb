"""URL routes: the API under /api/v1/, health probes, admin."""

from django.contrib import admin
from django.urls import path

urlpatterns = [path("admin/", admin.site.urls)]
