"""Reads of networks, through the caller's tenancy: a viewer sees the networks of the project they
act in and the shared ones; staff naming no project see all (the VMs' rule,
:func:`apps.vms.selectors.visible_project`, plus shared networks). A VM's NICs: :mod:`.nics`."""

from django.db.models import Q, QuerySet

from apps.core.context import Viewer
from apps.vms.selectors import visible_project

from .models import Network


def network_visible_to(viewer: Viewer) -> QuerySet[Network]:
    """Every network ``viewer`` sees, with its project's name."""
    networks = Network.objects.select_related("project")
    project = visible_project(viewer)
    return networks if project is None else networks.filter(Q(project_id=project) | Q(shared=True))
