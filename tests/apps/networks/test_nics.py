"""A VM's NICs in its API answer (every read path: fixed SQL, the ORM fallback, instances, cached
bodies, SQLite) and in the description a node gets (``vm_spec``), without a query per VM."""

from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from apps.core.context import Viewer
from apps.networks.services import network_create
from apps.projects.services import personal_project
from apps.vms import dispatch, reads
from apps.vms.models import VM
from apps.vms.representation import vm_data
from apps.vms.selectors import vm_row_data, vm_rows, vm_visible_to
from apps.vms.services import VMRequest, vm_batch_create
from apps.vms.tasks import batch_dispatch

pytestmark = pytest.mark.django_db


@pytest.fixture
def attached(user: Any, node: Any, image: Any) -> list[VM]:
    project = personal_project(user)
    network_create(project_id=project.pk, name="lan", cidr="10.1.0.0/24", dns=["10.1.0.53"])
    network_create(project_id=project.pk, name="dmz", cidr="10.2.0.0/28", external=True)
    requests = [
        VMRequest(name=f"vm{i}", image=image, vcpus=1, memory_mb=64, disk_gb=1, networks=["lan", "dmz"])
        for i in range(5)
    ]
    _, vms = vm_batch_create(owner=user, project_id=project.pk, requests=requests)
    return vms


def test_every_read_path_shows_the_nics_in_guest_order(attached: list[VM], user: Any) -> None:
    vm = attached[2]
    viewer = Viewer(user_id=user.pk, is_staff=False, project_id=vm.project_id)
    by_sql = reads.rows(f"{reads.select_sql()} WHERE v.id = %s", [vm.pk])[0]
    by_orm = vm_row_data(vm_rows(vm_visible_to(viewer).filter(pk=vm.pk)).get())
    by_instance = vm_data(VM.objects.get(pk=vm.pk))
    nics = by_sql["nics"]
    assert nics == by_orm["nics"] == by_instance["nics"]
    assert [nic["network"] for nic in nics] == ["lan", "dmz"]
    assert [nic["ipv4"] for nic in nics] == ["10.1.0.4", "10.2.0.4"]
    assert all(nic["mac"].startswith("52:54:00:") for nic in nics)
    assert reads.vm_detail(vm_id=str(vm.pk), viewer=viewer) is not None


def test_vm_spec_carries_each_nic_with_its_whole_network(attached: list[VM]) -> None:
    spec = dispatch.vm_spec(VM.objects.select_related("image").get(pk=attached[0].pk))
    lan, dmz = spec["nics"]
    assert lan["ipv4"] == "10.1.0.2" and dmz["ipv4"] == "10.2.0.2"
    network: dict[str, object] = dict(lan["network"])
    assert isinstance(network.pop("vni"), int) and str(network.pop("id")).isdigit()
    assert network == {
        "name": "lan",
        "cidr": "10.1.0.0/24",
        "gateway": "10.1.0.1",
        "dns": ["10.1.0.53"],
        "mtu": 1450,
        "external": False,
        "physical_network": "",
    }
    assert dmz["network"]["external"] is True


def test_a_batchs_node_tasks_read_the_nics_in_one_query(
    user: Any, node: Any, image: Any, attached: list[VM]
) -> None:
    batch = attached[0].batch_items.get().batch
    with CaptureQueriesContext(connection) as few:
        assert batch_dispatch(batch_id=str(batch.pk), task_name="novacron.node.vm_create") == 5
    project = personal_project(user)
    requests = [
        VMRequest(name=f"more{i}", image=image, vcpus=1, memory_mb=64, disk_gb=1, networks=["lan"])
        for i in range(11)
    ]
    more, _ = vm_batch_create(owner=user, project_id=project.pk, requests=requests)
    with CaptureQueriesContext(connection) as many:
        assert batch_dispatch(batch_id=str(more.pk), task_name="novacron.node.vm_create") == 11
    assert len(many) == len(few) <= 3
