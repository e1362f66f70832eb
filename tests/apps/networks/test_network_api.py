"""The network endpoints: create within the quota, the 400s of bad addressing, tenancy as for VMs,
shared networks by staff, renames shown by the VMs, the 409 of a network in use, the audit trail."""

from typing import Any

import pytest

from apps.audit.models import AuditEvent
from apps.networks.models import Network
from apps.projects.services import personal_project
from tests.conftest import set_quota, vm_payload

pytestmark = pytest.mark.django_db


def _create(client: Any, **fields: Any) -> Any:
    return client.post("/api/v1/networks/", {"name": "net", "cidr": "10.20.0.0/24", **fields}, format="json")


def _error(response: Any) -> tuple[int, str, dict[str, Any]]:
    error = response.json()["error"]
    return response.status_code, error["code"], error.get("fields", {})


def test_a_member_creates_a_network_with_a_vni_and_the_first_host_as_gateway(api: Any, user: Any) -> None:
    response = _create(api, dns=["9.9.9.9"], external=True)
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["cidr"] == "10.20.0.0/24" and body["gateway"] == "10.20.0.1"
    assert body["dns"] == ["9.9.9.9"] and body["mtu"] == 1450 and body["external"] is True
    assert body["project"] == personal_project(user).name and body["shared"] is False
    assert 1 <= body["vni"] <= 16777215
    assert api.get(f"/api/v1/networks/{body['id']}/").json() == body
    for page in ("/api/v1/networks/", f"/api/v1/networks/{body['id']}/"):  # the browsable API's forms
        assert api.get(page, HTTP_ACCEPT="text/html").status_code == 200
    event = AuditEvent.objects.get(action="network.create")
    assert event.target_id == str(body["id"]) and event.detail["values"]["cidr"] == "10.20.0.0/24"


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"cidr": "10.0.0.0/8"}, "cidr", "/16 to /29"),
        ({"cidr": "10.20.0.0/8"}, "cidr", "has host bits set"),
        ({"cidr": "10.20.0.0/30"}, "cidr", "/16 to /29"),
        ({"cidr": "10.20.0.1/24"}, "cidr", "not an IPv4 network"),
        ({"cidr": "fd00::/64"}, "cidr", "not an IPv4 network"),
        ({"gateway": "10.21.0.1"}, "gateway", "host address of 10.20.0.0/24"),
        ({"gateway": "10.20.0.255"}, "gateway", "host address"),
        ({"gateway": "10.20.0.0"}, "gateway", "host address"),
        ({"dns": ["not-an-address"]}, "dns[0]", "valid IPv4"),
        ({"dns": ["1.1.1.1", "1.0.0.1", "8.8.8.8", "8.8.4.4"]}, "dns", ""),
        ({"mtu": 100}, "mtu", ""),
        ({"name": "bad name"}, "name", ""),
    ],
)
def test_bad_addressing_is_a_400_naming_the_field(
    api: Any, fields: dict[str, Any], field: str, words: str
) -> None:
    response = _create(api, **fields)
    status, code, named = _error(response)
    assert (status, code) == (400, "invalid") and field in named, response.content
    assert words in " ".join(named[field])
    assert not Network.objects.exists()


def test_overlapping_networks_of_the_project_or_shared_ones_are_refused(
    api: Any, other_api: Any, staff_api: Any
) -> None:
    assert _create(api).status_code == 201
    status, _, named = _error(_create(api, name="inner", cidr="10.20.0.128/25"))
    assert status == 400 and "overlaps" in named["cidr"][0] and "net (10.20.0.0/24)" in named["cidr"][0]
    assert _create(other_api).status_code == 201  # another project's private network: no clash
    assert _create(staff_api, name="public", cidr="10.30.0.0/16", shared=True).status_code == 201
    status, _, named = _error(_create(api, name="mine", cidr="10.30.5.0/24"))
    assert status == 400 and "public (10.30.0.0/16)" in named["cidr"][0]


def test_names_are_unique_per_project(api: Any, other_api: Any) -> None:
    assert _create(api).status_code == 201
    status, _, named = _error(_create(api, cidr="10.21.0.0/24"))
    assert status == 400 and "already has a network named 'net'" in named["name"][0]
    assert _create(other_api).status_code == 201


def test_the_quota_of_networks_is_a_403_as_the_vm_quotas_answer(api: Any, user: Any) -> None:
    set_quota(user, max_networks=1)
    assert _create(api).status_code == 201
    response = _create(api, name="second", cidr="10.21.0.0/24")
    assert _error(response)[:2] == (403, "quota_exceeded")
    assert "networks 1+1 > 1" in response.json()["error"]["message"]


def test_another_projects_private_network_is_404_and_not_listed(api: Any, other_api: Any) -> None:
    network = _create(api).json()
    url = f"/api/v1/networks/{network['id']}/"
    assert other_api.get(url).status_code == 404
    assert other_api.patch(url, {"name": "mine"}, format="json").status_code == 404
    assert other_api.delete(url).status_code == 404
    assert other_api.get("/api/v1/networks/").json()["results"] == []
    assert Network.objects.get().name == "net"


def test_shared_and_provider_networks_are_staffs_and_everyone_sees_and_attaches_them(
    api: Any, staff_api: Any, node: Any, image: Any
) -> None:
    assert _create(api, shared=True).status_code == 403
    assert _create(api, physical_network="lan").status_code == 403
    shared = _create(staff_api, name="public", cidr="172.31.0.0/24", shared=True, physical_network="lan")
    assert shared.status_code == 201, shared.content
    url = f"/api/v1/networks/{shared.json()['id']}/"
    assert [found["name"] for found in api.get("/api/v1/networks/").json()["results"]] == ["public"]
    assert api.patch(url, {"name": "mine"}, format="json").status_code == 403
    assert api.delete(url).status_code == 403
    vm = api.post("/api/v1/vms/", vm_payload(networks=["public"]), format="json")
    assert vm.status_code == 202, vm.content
    assert vm.json()["nics"][0]["network"] == "public"
    assert vm.json()["nics"][0]["ipv4"] == "172.31.0.2"


def test_a_rename_shows_in_the_vms_answers_and_dns_changes(api: Any, node: Any, image: Any) -> None:
    network = _create(api).json()
    vm = api.post("/api/v1/vms/", vm_payload(networks=["net"]), format="json").json()
    detail = f"/api/v1/vms/{vm['id']}/"
    assert api.get(detail).json()["nics"][0]["network"] == "net"
    assert api.get("/api/v1/vms/").json()["results"][0]["nics"][0]["network"] == "net"  # cached now
    renamed = api.patch(
        f"/api/v1/networks/{network['id']}/", {"name": "lan", "dns": ["1.1.1.1"]}, format="json"
    )
    assert renamed.status_code == 200 and renamed.json()["dns"] == ["1.1.1.1"]
    assert api.get(detail).json()["nics"][0]["network"] == "lan"
    assert api.get("/api/v1/vms/").json()["results"][0]["nics"][0]["network"] == "lan"
    bad = api.patch(f"/api/v1/networks/{network['id']}/", {"cidr": "10.9.0.0/24"}, format="json")
    assert _error(bad)[:2] == (400, "invalid")


def test_a_network_in_use_is_a_409_and_deletable_once_its_vms_are_gone(
    api: Any, node: Any, image: Any
) -> None:
    network = _create(api).json()
    url = f"/api/v1/networks/{network['id']}/"
    vm = api.post("/api/v1/vms/", vm_payload(networks=["net"], node=None), format="json").json()
    response = api.delete(url)
    assert (
        _error(response)[:2] == (409, "conflict") and "in use by 1 NIC" in response.json()["error"]["message"]
    )
    from apps.vms.services import vm_record_report

    assert api.delete(f"/api/v1/vms/{vm['id']}/").status_code == 202
    vm_record_report(vm_id=vm["id"], operation="delete", ok=True, state="deleted", reason="", node="node1")
    assert api.delete(url).status_code == 204
    assert not Network.objects.exists()


def test_a_reader_reads_and_cannot_write(team: Any) -> None:
    _, clients = team(writer="member", reader="reader")
    as_writer, as_reader = clients["writer"], clients["reader"]
    assert _create(as_reader).status_code == 403
    created = _create(as_writer)
    assert created.status_code == 201 and created.json()["project"] == "team"
    assert as_reader.get(f"/api/v1/networks/{created.json()['id']}/").status_code == 200
    assert as_reader.delete(f"/api/v1/networks/{created.json()['id']}/").status_code == 403
