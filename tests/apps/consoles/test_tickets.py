"""Console tickets: who gets one (REST, tenancy and roles), and the WebSocket refusing bad ones (4401)
and giving up on a node it cannot reach (1011), through the real streams server and Redis."""

import json
import secrets
import time
from typing import Any

import pytest
import redis
import websocket
from django.conf import settings
from django.core.management import CommandError, call_command

from apps.audit.models import AuditEvent
from apps.consoles.tickets import KEY, _digest
from apps.vms.models import VM
from tests.apps.vms.conftest import forget

from .conftest import stream_url

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def streams(launch_streams: Any) -> str:
    return launch_streams()


def _vm(owner: Any, make_node: Any, make_image: Any, *, state: str = "running", project: Any = None) -> VM:
    node = make_node(dwcp_address="127.0.0.1:1")  # nothing listens there
    fields = {"project": project} if project is not None else {}
    return VM.objects.create(
        owner=owner,
        name=f"viewed-{secrets.token_hex(2)}",
        image=make_image(f"img-{secrets.token_hex(3)}"),
        node=node,
        state=state,
        vcpus=1,
        memory_mb=128,
        disk_gb=1,
        **fields,
    )


def test_a_ticket_is_for_the_callers_running_vms_and_a_readers_is_refused(
    api, other_api, staff_api, user, team, make_node, make_image
):
    vm = _vm(user, make_node, make_image)
    response = api.post(f"/api/v1/vms/{vm.pk}/console/")
    assert response.status_code == 201, response.json()
    body = response.json()
    assert body["expires_in"] == 30 and len(body["ticket"]) >= 40
    assert body["url"] == (
        f"ws://testserver:{settings.STREAMS_PORT}/api/v1/vms/{vm.pk}/console/stream/?ticket={body['ticket']}"
    )
    assert api.post(f"/api/v1/vms/{vm.pk}/console/", secure=True).json()["url"].startswith("wss://")
    audited = (
        AuditEvent.objects.filter(action="vm.console", target_id=str(vm.pk)).order_by("timestamp").first()
    )
    assert audited is not None and audited.actor_id == user.pk and audited.status == 201
    assert body["ticket"] not in json.dumps(audited.detail)  # the ticket is never kept
    assert other_api.post(f"/api/v1/vms/{vm.pk}/console/").status_code == 404
    assert staff_api.post(f"/api/v1/vms/{vm.pk}/console/").status_code == 201

    project, clients = team(writer="member", reader="reader")
    shared = _vm(user, make_node, make_image, project=project)
    assert clients["writer"].post(f"/api/v1/vms/{shared.pk}/console/").status_code == 201
    refused = clients["reader"].post(f"/api/v1/vms/{shared.pk}/console/")
    assert refused.status_code == 403 and "reader" in refused.json()["error"]["message"]

    VM.objects.filter(pk=vm.pk).update(state="stopped")
    stopped = api.post(f"/api/v1/vms/{vm.pk}/console/")
    assert stopped.status_code == 409
    assert (
        stopped.json()["error"]["message"]
        == f"VM {vm.name} is stopped: its console can be opened while it runs."
    )


def test_bad_tickets_are_refused_with_4401_saying_why(api, user, make_node, make_image, streams, viewers):
    vm = _vm(user, make_node, make_image)
    other = _vm(user, make_node, make_image)

    def ticket(vm_id: Any) -> dict[str, Any]:
        return api.post(f"/api/v1/vms/{vm_id}/console/").json()

    forged = {"url": f"ws://x/api/v1/vms/{vm.pk}/console/stream/?ticket={secrets.token_urlsafe(32)}"}
    assert viewers.open(stream_url(streams, forged)).wait_closed() == (
        4401,
        "unknown ticket (never issued here, or expired long ago)",
    )
    for_other = ticket(other.pk)
    misdirected = for_other | {"url": for_other["url"].replace(str(other.pk), str(vm.pk))}
    assert viewers.open(stream_url(streams, misdirected)).wait_closed() == (
        4401,
        "the ticket is for another VM",
    )

    expired = ticket(vm.pk)
    client = redis.Redis.from_url(settings.REDIS_URL)
    key = KEY.format(digest=_digest(expired["ticket"]))
    claims = json.loads(client.get(key) or b"{}")
    client.set(key, json.dumps(claims | {"expires": time.time() - 1}), keepttl=True)
    code, reason = viewers.open(stream_url(streams, expired)).wait_closed()
    assert (code, reason) == (4401, "the ticket expired (valid 30 s); ask for a new one")

    for path in ("/api/v1/vms/not-a-uuid/console/stream/?ticket=x", "/api/v1/elsewhere/"):
        with pytest.raises(websocket.WebSocketBadStatusException) as refused:
            viewers.open(streams.replace("http://", "ws://") + path)
        assert refused.value.status_code == 403

    # A good ticket for a VM whose node does not answer: the console gives up after its attempts.
    good = ticket(vm.pk)
    first = viewers.open(stream_url(streams, good))
    code, reason = first.wait_closed()
    assert code == 1011 and reason.startswith(f"node {vm.node.name} did not open the console")
    assert first.events[-1] == {"event": "closed", "reason": first.events[-1]["reason"]}
    assert viewers.open(stream_url(streams, good)).wait_closed() == (
        4401,
        "the ticket was already used; ask for a new one",
    )


def test_tickets_are_rate_limited_per_user(api, user, make_node, make_image):
    forget("throttle")
    vm = _vm(user, make_node, make_image)
    try:
        answers = [api.post(f"/api/v1/vms/{vm.pk}/console/") for _ in range(31)]  # the test rate: 30/min
    finally:
        forget("throttle")
    assert [answer.status_code for answer in answers[:30]] == [201] * 30
    assert answers[30].status_code == 429
    assert "throttled" in answers[30].json()["error"]["message"]


def test_the_cli_names_the_vm_it_cannot_attach_to(user, other_user, make_node, make_image):
    missing = "00000000-0000-4000-8000-000000000000"
    with pytest.raises(CommandError, match=f"no VM with id {missing}"):
        call_command("console", missing)
    with pytest.raises(CommandError, match="no VM named 'nope'"):
        call_command("console", "nope")
    mine = _vm(user, make_node, make_image)
    theirs = _vm(other_user, make_node, make_image)
    VM.objects.filter(pk=theirs.pk).update(name=mine.name)
    with pytest.raises(CommandError, match=f"several VMs are named '{mine.name}'.*{mine.pk}"):
        call_command("console", mine.name)
