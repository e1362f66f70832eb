"""How first-hand a node's failure report is (the control plane keeps the highest-ranked as the error)."""

import pytest

from workers.dwcp.errors import TransferInterrupted
from workers.node.migration.context import failure_cause
from workers.node.migration.memory_check import MemoryMismatch
from workers.qemu import QemuError


@pytest.mark.parametrize(
    ("exc", "cause"),
    [
        (MemoryMismatch("3 of 128 MiB differ", cause="measured"), "measured"),
        (MemoryMismatch("the destination's memory check failed", cause="relayed"), "relayed"),
        (TransferInterrupted("initiator may not send END in state closed"), "relayed"),
        (OSError(28, "No space left on device"), "error"),
        (QemuError("QEMU exited"), "error"),
    ],
)
def test_a_cut_transfer_only_relays_and_a_local_error_is_first_hand(exc, cause):
    assert failure_cause(exc) == cause
