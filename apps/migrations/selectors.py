"""Reads of migrations through the caller's tenancy: a migration is seen where its VM is
(:func:`apps.vms.selectors.visible_project`)."""

from django.db.models import QuerySet

from apps.core.context import Viewer
from apps.vms.selectors import visible_project

from .models import Migration


def migration_visible(*, viewer: Viewer) -> QuerySet[Migration]:
    queryset = Migration.objects.select_related("vm", "source_node", "dest_node", "requested_by")
    project = visible_project(viewer)
    return queryset if project is None else queryset.filter(vm__project_id=project)
