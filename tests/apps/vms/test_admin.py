"""Django admin: the fleet's pages render for staff and VM actions go through the same services as the API."""

import pytest

from apps.audit.models import AuditEvent
from apps.vms.models import VM
from tests.conftest import vm_payload

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client(client, staff):
    client.force_login(staff)
    return client


@pytest.mark.parametrize(
    "path",
    [
        "/admin/vms/vm/",
        "/admin/vms/vm/?state__exact=running",
        "/admin/vms/node/",
        "/admin/vms/image/",
        "/admin/vms/batchoperation/",
        "/admin/vm_migrations/migration/",
        "/admin/monitoring/alert/",
        "/admin/monitoring/alertrule/",
        "/admin/monitoring/apilog/",
        "/admin/auth/user/",
    ],
)
def test_admin_pages_render(admin_client, path, api, node, image):
    api.post("/api/v1/vms/", vm_payload(), format="json")
    assert admin_client.get(path).status_code == 200


def test_admin_needs_staff(client, user):
    client.force_login(user)
    assert client.get("/admin/vms/vm/").status_code == 302


def test_admin_actions_use_the_services(admin_client, api, node, image):
    vm_id = api.post("/api/v1/vms/", vm_payload(), format="json").json()["id"]
    response = admin_client.post(
        "/admin/vms/vm/", {"action": "stop_vms", "_selected_action": [vm_id]}, follow=True
    )
    assert "Cannot stop VM web-1: it is pending." in response.content.decode()
    VM.objects.filter(pk=vm_id).update(state="running")
    admin_client.post("/admin/vms/vm/", {"action": "stop_vms", "_selected_action": [vm_id]})
    assert VM.objects.get(pk=vm_id).pending_action == "stop"
    admin_client.post("/admin/vms/vm/", {"action": "delete_vms", "_selected_action": [vm_id]})
    assert VM.objects.get(pk=vm_id).state == "deleting"
    trail = AuditEvent.objects.filter(target_id=vm_id, detail__via="admin").order_by("timestamp")
    assert [(event.action, event.outcome, event.status) for event in trail] == [
        ("vm.stop", "refused", 409),
        ("vm.stop", "ok", 200),
        ("vm.delete", "ok", 200),
    ]
    assert {event.project_id for event in trail} == {VM.objects.get(pk=vm_id).project_id}
