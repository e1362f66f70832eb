"""A VM's console end to end: the streams server's WebSocket, DWCP to real node workers, the node's
console multiplexer and QEMU/TCG test guests; several viewers, limits, deletion, a live migration.

Input is checked with the test guest's console shell: ``echo po""ng TAG`` prints ``pong TAG``, which
the echoed command line (quotes and all) never matches."""

import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

from apps.migrations.models import Migration
from apps.vms.models import Node
from tests.workers.node.conftest import ROOT, Cluster, wait_for
from tests.workers.node.test_migration import _create_running
from workers import contract
from workers.dwcp import DWCPError, open_tunnel, sign_ticket

from .conftest import Viewer, stream_url

pytestmark = [pytest.mark.integration, pytest.mark.qemu, pytest.mark.django_db(transaction=True)]

BOOTED = r"NovaCron test guest"  # printed on its console at boot, before the shell: in the scrollback
SERVING = r"testguest# "  # the shell's prompt: it reads what is typed


def _open(api: Any, viewers: Any, streams: str, vm_id: str) -> Viewer:
    response = api.post(f"/api/v1/vms/{vm_id}/console/")
    assert response.status_code == 201, response.json()
    return viewers.open(stream_url(streams, response.json()))


def _answers(viewer: Viewer, tag: str, *, sent_by: Viewer | None = None) -> None:
    """``echo po""ng TAG`` typed (by ``sent_by``, else by ``viewer``) reaches the guest's shell;
    ``viewer`` sees its answer."""
    start = len(viewer.output)
    (sent_by or viewer).type(f'echo po""ng {tag}\n')
    viewer.wait_output(rf"pong {tag}\r?\n", start=start)


def _collect(stream: Any, into: bytearray) -> None:
    while chunk := stream.read1(4096):
        into.extend(chunk)


def _refused_by_the_node(node: Node, vm_id: str, token: str, tmp_path: Path) -> str:
    """Why the node refuses a console tunnel opened with ``token``."""
    local = tmp_path / "refused.sock"
    tunnel = open_tunnel(
        address=node.dwcp_address,
        local_path=local,
        ticket=token,
        secret=settings.DWCP_SECRET,
        source_node=contract.CONSOLE_SOURCE_NODE,
        streams=1,
    )
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(str(local))
        client.settimeout(15)
        assert client.recv(100) == b""  # nothing of the console, only the end
    with pytest.raises(DWCPError) as refused:
        tunnel.wait(15)
    return str(refused.value)


def test_viewers_share_the_console_within_limits_until_the_vm_is_deleted(
    cluster: Cluster, api, launch_streams, viewers, tmp_path: Path
):
    streams = launch_streams(CONSOLE_MAX_PER_VM="3")
    node_name = next(iter(cluster.nodes))
    vm_id = _create_running(api, "watched", node_name)

    first = _open(api, viewers, streams, vm_id)
    assert first.wait_event("connected") == {"event": "connected", "node": node_name}
    first.wait_output(BOOTED)  # the scrollback holds the boot output
    first.wait_output(SERVING)
    _answers(first, "a1")

    second = _open(api, viewers, streams, vm_id)
    second.wait_event("connected")
    second.wait_output(BOOTED)
    _answers(second, "b1")
    first.wait_output(r"pong b1\r?\n")  # what one viewer typed, every viewer sees answered
    _answers(second, "a2", sent_by=first)

    third = _open(api, viewers, streams, vm_id)
    third.wait_event("connected")
    third.ws.send_binary(b"x" * 5000)
    assert third.wait_closed() == (1009, "an input message may hold 4096 bytes, not 5000")
    assert third.events[-1] == {"event": "closed", "reason": "an input message may hold 4096 bytes, not 5000"}
    _answers(first, "c1")  # the others go on
    second.wait_output(r"pong c1\r?\n")

    third = _open(api, viewers, streams, vm_id)
    third.wait_event("connected")
    assert _open(api, viewers, streams, vm_id).wait_closed() == (
        4429,
        "This VM has 3 consoles open, the most allowed.",
    )

    node = Node.objects.get(name=node_name)
    forged = sign_ticket(
        secret="not-the-dwcp-secret-of-the-cluster",
        source_node=contract.CONSOLE_SOURCE_NODE,
        dest_node=node_name,
        kind="console",
        target=vm_id,
    )
    unsigned = forged.split(".")[0] + "."
    for token in (forged, unsigned):
        assert "signature does not match" in _refused_by_the_node(node, vm_id, token, tmp_path)
    _answers(first, "d1")  # the refusals cost the viewers nothing

    flood = [{"url": f"ws://x/api/v1/vms/{vm_id}/console/stream/?ticket=flood-{n}"} for n in range(40)]
    with ThreadPoolExecutor(max_workers=20) as pool:
        closes = list(pool.map(lambda body: Viewer(stream_url(streams, body)).wait_closed()[0], flood))
    assert closes == [4401] * 40
    _answers(first, "e1")  # a flood of bad connections leaves the open consoles alone
    second.wait_output(r"pong e1\r?\n")

    assert api.delete(f"/api/v1/vms/{vm_id}/").status_code == 202
    for viewer in (first, second, third):
        assert viewer.wait_closed(90) == (4404, "the VM was deleted")
        assert viewer.events[-1] == {"event": "closed", "reason": "the VM was deleted"}


def test_a_console_follows_its_vm_through_a_live_migration(cluster: Cluster, api, launch_streams, viewers):
    streams = launch_streams()
    source, dest = list(cluster.nodes)
    vm_id = _create_running(api, "mover", source)
    viewer = _open(api, viewers, streams, vm_id)
    assert viewer.wait_event("connected") == {"event": "connected", "node": source}
    viewer.wait_output(SERVING)
    _answers(viewer, "before")

    response = api.post(f"/api/v1/vms/{vm_id}/migrate/", {"dest_node": dest}, format="json")
    assert response.status_code == 202, response.json()
    reconnecting = viewer.wait_event("reconnecting", 180)
    assert source in reconnecting["reason"]
    assert viewer.wait_event("connected", 120, count=2) == {"event": "connected", "node": dest}
    _answers(viewer, "after")
    assert Migration.objects.get(pk=response.json()["id"]).status == "completed"

    # The operators' CLI attaches to the same console (at its new node) beside the WebSocket viewer.
    command = subprocess.Popen(
        [sys.executable, "manage.py", "console", "mover"],
        cwd=ROOT,
        env=cluster.env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    printed, errors = bytearray(), bytearray()
    readers = [
        threading.Thread(target=_collect, args=(command.stdout, printed)),
        threading.Thread(target=_collect, args=(command.stderr, errors)),
    ]
    for reader in readers:
        reader.start()
    try:
        start = len(viewer.output)
        command.stdin.write(b'echo po""ng cli\n')  # typed at once: the CLI sends it once connected
        command.stdin.flush()
        viewer.wait_output(r"pong cli\r?\n", start=start)  # typed in the CLI, seen by the WebSocket viewer
        wait_for(lambda: b"pong cli" in printed, 30, "the CLI to print the answer")
        assert printed.index(b"pong after") < printed.index(b"pong cli")  # the scrollback came first
        command.stdin.write(b"\x1d")  # Ctrl-]
        command.stdin.flush()
        assert command.wait(30) == 0
    finally:
        command.kill()
        for reader in readers:
            reader.join(10)
    stderr = errors.decode()
    assert f"[console connected: {dest}]" in stderr and "Detached." in stderr, stderr
