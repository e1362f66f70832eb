"""The Image admin: its store fields and, read only, the nodes that hold the image."""

from typing import Any

import pytest

from apps.images.models import NodeImage, NodeImageState

pytestmark = pytest.mark.django_db


def test_the_image_admin_shows_store_fields_and_node_caches(
    client: Any, staff: Any, image: Any, node: Any
) -> None:
    NodeImage.objects.create(node=node, image=image, state=NodeImageState.READY, source="store")
    client.force_login(staff)
    listing = client.get("/admin/vms/image/")
    assert listing.status_code == 200 and image.name in listing.content.decode()
    page = client.get(f"/admin/vms/image/{image.pk}/change/").content.decode()
    for shown in ("sha256", "virtual_size_bytes", "status_reason", "min_disk_gb", node.name, "store"):
        assert shown in page, shown
