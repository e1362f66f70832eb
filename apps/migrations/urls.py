"""Routes of the migrations app beside its router-registered viewset: a node's drain.

The drain is the migrations app's (it starts migrations) though its URL is under the node's,
``/api/v1/nodes/{id}/drain/``; included by ``apps/core/urls.py`` before the router.
"""

from django.urls import re_path

from .views import NodeDrainView

urlpatterns = [
    # The router's pattern for the node routes (so the schema reads the node's id as it did).
    re_path(r"^nodes/(?P<pk>[^/.]+)/drain/$", NodeDrainView.as_view(), name="node-drain"),
]
