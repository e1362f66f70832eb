"""The admin pages of networks and NICs: staff read them; they change nothing (the API's services do)."""

from typing import Any

import pytest

from apps.networks.models import Network, Nic
from apps.networks.services import network_create
from apps.projects.services import personal_project
from apps.vms.services import VMRequest, vm_create

pytestmark = pytest.mark.django_db


def test_staff_read_networks_and_nics_and_change_nothing(
    client: Any, staff: Any, user: Any, node: Any, image: Any
) -> None:
    project = personal_project(user)
    network = network_create(project_id=project.pk, name="lan", cidr="10.1.0.0/24")
    vm_create(
        owner=user,
        project_id=project.pk,
        request=VMRequest(name="vm", image=image, vcpus=1, memory_mb=64, disk_gb=1, networks=["lan"]),
    )
    nic = Nic.objects.get()
    client.force_login(staff)
    for url in (
        "/admin/networks/network/",
        f"/admin/networks/network/{network.pk}/change/",
        "/admin/networks/nic/",
        f"/admin/networks/nic/{nic.pk}/change/",
    ):
        response = client.get(url)
        assert response.status_code == 200, url
        assert "10.1.0.2" in response.content.decode() or url.endswith("/network/"), url
    assert client.get("/admin/networks/network/add/").status_code == 403
    assert client.post(f"/admin/networks/network/{network.pk}/delete/", {"post": "yes"}).status_code == 403
    assert Network.objects.get().name == "lan"
