"""The plain-function representations of VMs match ``VMSerializer``, the API's reference shape."""

from typing import Any

import pytest

from apps.vms.choices import VMAction, VMState
from apps.vms.models import VM
from apps.vms.reads import detail_sql, rows
from apps.vms.selectors import vm_data, vm_row_representation
from apps.vms.serializers import VMSerializer

pytestmark = pytest.mark.django_db


@pytest.fixture
def vms(user: Any, node: Any, image: Any) -> list[VM]:
    return [
        VM.objects.create(owner=user, name="plain", image=image, node=node, vcpus=1, memory_mb=64, disk_gb=1),
        VM.objects.create(
            owner=user,
            name="unplaced",
            image=image,
            node=None,
            vcpus=2,
            memory_mb=128,
            disk_gb=3,
            state=VMState.ERROR,
            state_reason="No node had room — «quoted» text",
            pending_action=VMAction.REBOOT,
        ),
    ]


def test_vm_data_is_vm_serializers_representation(vms):
    for vm in vms:
        assert vm_data(vm) == VMSerializer(vm).data
        reloaded = VM.objects.select_related("owner", "node", "image").get(pk=vm.pk)  # values as stored
        assert vm_data(reloaded) == VMSerializer(reloaded).data


def test_a_fixed_sql_row_is_vm_serializers_representation(vms):
    for vm in vms:
        (row,) = rows(detail_sql(owned=False), [vm.pk])
        assert vm_row_representation(row) == VMSerializer(VM.objects.get(pk=vm.pk)).data
