"""OPTIONS answers for the browsable API and clients: DRF's metadata, safe on collection routes.

DRF's ``SimpleMetadata`` describes PUT by calling ``view.get_object()``; on a collection route that
accepts PUT (``PUT /api/v1/vms/batch/``) there is no object and DRF's lookup assertion made OPTIONS
answer 500 (found by the schemathesis fuzz test).
"""

from typing import TYPE_CHECKING, Any

from rest_framework.metadata import SimpleMetadata

if TYPE_CHECKING:  # rest_framework.views imports this module through its settings
    from rest_framework.request import Request
    from rest_framework.views import APIView


class CollectionSafeMetadata(SimpleMetadata):
    def determine_actions(self, request: "Request", view: "APIView") -> dict[str, Any]:
        if getattr(view, "detail", None) is False and hasattr(view, "get_object"):
            # This view instance serves this OPTIONS request only: there is no object to look up.
            view.get_object = lambda: None
        actions: dict[str, Any] = super().determine_actions(request, view)
        return actions
