"""The console load of ``bench.py --consoles`` (``bench/api/consoles.py``) against the real streams
service and API: tickets from the live server, WebSockets on the streams service, DWCP to a real node
console manager, stand-in guests on the VMs' console sockets."""

import time
import uuid
from collections import Counter
from typing import Any

import pytest

from apps.accounts.services import token_create
from bench.api.consoles import ConsoleLoad, ConsoleNode, ConsoleSlot, Spread, register_rows
from tests.streams_server import launch_streams
from workers.dwcp import limits

__all__ = ["launch_streams"]


@pytest.mark.parametrize("consoles", [1, 5, 100, 101, 500])
def test_the_spread_of_consoles_stays_within_the_console_limits_and_a_nodes_sessions(
    consoles: int, settings: Any
) -> None:
    spread = Spread(consoles)
    vms = [spread.vm_of(console) for console in range(consoles)]
    assert set(vms) == set(range(spread.vms))
    assert max(Counter(vms).values()) <= settings.CONSOLE_MAX_PER_VM
    by_user = Counter(spread.user_of(vm) for vm in vms)
    assert set(by_user) == set(range(spread.users))
    assert max(by_user.values()) <= settings.CONSOLE_MAX_PER_USER
    by_node = Counter(spread.node_of(vm) for vm in vms)
    assert set(by_node) == set(range(spread.nodes))
    assert max(by_node.values()) < limits.MAX_SESSIONS


@pytest.mark.django_db(transaction=True)
def test_every_command_typed_on_five_consoles_over_two_vms_is_answered(
    live_server: Any, launch_streams: Any, settings: Any, make_user: Any
) -> None:
    settings.STREAMS_URL = launch_streams()  # the tickets' WebSocket URLs
    owners = [make_user(), make_user()]
    vm_ids = [str(uuid.uuid4()) for _ in owners]
    node = ConsoleNode("bench-console-0", vm_ids, settings.DWCP_SECRET)
    try:
        register_rows(node, {vm_id: owner.pk for vm_id, owner in zip(vm_ids, owners, strict=True)})
        tokens = [token_create(user=owner).secret for owner in owners]
        load = ConsoleLoad(
            api=live_server.url,
            slots=[ConsoleSlot(vm_ids[index % 2], tokens[index % 2]) for index in range(5)],
        )
        try:
            load.open()
            with load.typing():
                time.sleep(5)
            report = load.report(rss_mb=0, cpu_percent=0, bench_cpu_percent=0)
            load.close()
            # Each WebSocket ended with the close handshake (not cut off after waiting for it).
            assert all(not reader.cancelled() and reader.exception() is None for reader in load.readers)
        finally:
            load.stop()
    finally:
        node.stop()

    assert (report.consoles, report.opened, report.vms) == (5, 5, 2), report.per_console
    assert report.sent >= 10 and report.answered == report.sent and report.complete == 5, report.per_console
    assert report.latency_median_ms is not None and report.latency_p95_ms is not None
    for console in report.per_console:
        # Each console shows its VM's ticks (one a second) and the echoes and answers of every viewer.
        assert console["output_bytes"] > 4 * len(b"[    1.000] vm-xxxxxxxx: tick 1\r\n"), console
        assert console["answered"] == console["sent"] >= 2 and console["closed"] == "", console
