"""Reads of images through the caller's tenancy: everyone sees the operators' catalog (no project)
and shared images; a private image is seen in its project only (another project's is 404, as an
unknown one); staff naming no project see all (:func:`apps.vms.selectors.visible_project`)."""

from django.db.models import Q, QuerySet

from apps.core.context import Viewer
from apps.vms.choices import ImageVisibility
from apps.vms.models import Image
from apps.vms.selectors import visible_project


def image_visible_to(viewer: Viewer) -> QuerySet[Image]:
    """Every image ``viewer`` sees, with its project."""
    images = Image.objects.select_related("project")
    project = visible_project(viewer)
    if project is None:
        return images
    return images.filter(
        Q(project__isnull=True) | Q(visibility=ImageVisibility.SHARED) | Q(project_id=project)
    )
