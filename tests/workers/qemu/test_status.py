"""Mapping QEMU's query-status answers and serial logs onto VmStatus, including malformed answers."""

from __future__ import annotations

from pathlib import Path

import pytest

from workers.qemu import VmState
from workers.qemu.status import log_tail, status_from_query

VM = "6f1c2a8e-3b7d-4e55-9a10-2c4b5d6e7f80"


@pytest.mark.parametrize(
    ("answer", "state"),
    [
        ({"status": "running", "running": True}, VmState.RUNNING),
        ({"status": "paused", "running": False}, VmState.PAUSED),
        ({"status": "postmigrate", "running": False}, VmState.PAUSED),
        ({"status": "guest-panicked", "running": False}, VmState.PAUSED),
        ({"status": "some-future-state"}, VmState.UNKNOWN),
        ({"running": True}, VmState.UNKNOWN),
        ({"status": 3}, VmState.UNKNOWN),
        ([], VmState.UNKNOWN),
        (None, VmState.UNKNOWN),
    ],
)
def test_query_status_answers_map_to_states_and_malformed_ones_to_unknown(answer, state):
    status = status_from_query(VM, 1234, answer)
    assert status.state is state
    assert status.pid == 1234
    assert status.reason


def test_a_log_tail_drops_escape_codes_and_blank_lines(tmp_path: Path):
    log = tmp_path / "serial.log"
    log.write_bytes(
        b"\x1bc\x1b[?7l\x1b[2J\x1b[0mSeaBIOS (version 1.16)\r\n\r\n"
        + b"".join(b"tick %d\r\n" % n for n in range(20))
    )
    assert log_tail(log) == tuple(f"tick {n}" for n in range(10, 20))
    assert log_tail(tmp_path / "absent.log") == ()
