"""What a node tells the control plane: task outcomes, VM state changes, registration.

Every report is a task on the control queue, named in ``workers.contract``; the control worker
applies it idempotently, so a report sent twice (a redelivered node task) changes nothing.
"""

import logging
from typing import Any

from celery import Celery

from workers import contract
from workers.qemu import NodeFacts, VmState, VmStatus

logger = logging.getLogger(__name__)

# How a node-side VM state reads in the control plane's VM states.
CONTROL_STATE = {
    VmState.RUNNING: "running",
    VmState.PAUSED: "running",
    VmState.STOPPED: "stopped",
    VmState.DEAD: "error",
    VmState.UNKNOWN: "error",
}


def vm_entry(status: VmStatus) -> dict[str, str]:
    """One VM as the control side reconciles it."""
    reason = status.reason
    if status.state in (VmState.DEAD, VmState.UNKNOWN) and status.serial_tail:
        reason = f"{reason}; last console lines: {' | '.join(status.serial_tail[-3:])}"
    return {
        "id": status.uuid,
        "state": CONTROL_STATE[status.state],
        "node_state": str(status.state),
        "reason": reason,
    }


class Reporter:
    """Sends reports from one node to the control queue."""

    def __init__(self, app: Celery, node: str) -> None:
        self.app = app
        self.node = node

    def _send(self, task: str, **kwargs: Any) -> None:
        self.app.send_task(task, kwargs=kwargs, queue=contract.CONTROL_QUEUE)

    def vm(
        self, *, vm_id: str, operation: str, ok: bool, state: str, reason: str = "", final: bool = True
    ) -> None:
        logger.info("VM %s %s: ok=%s state=%s %s", vm_id, operation, ok, state, reason)
        self._send(
            contract.CONTROL_VM_REPORT,
            vm_id=vm_id,
            operation=operation,
            ok=ok,
            state=state,
            reason=reason[:1000],
            node=self.node,
            final=final,
        )

    def vm_states(self, statuses: list[VmStatus], *, complete: bool) -> None:
        self._send(
            contract.CONTROL_NODE_VM_STATES,
            node=self.node,
            vms=[vm_entry(status) for status in statuses],
            complete=complete,
        )

    def register(self, *, address: str, dwcp_address: str, facts: NodeFacts) -> None:
        hypervisor = facts.to_dict()
        self._send(
            contract.CONTROL_NODE_REGISTER,
            name=self.node,
            address=address,
            dwcp_address=dwcp_address,
            vcpus=facts.cpu_count,
            memory_mb=facts.memory_mb,
            disk_gb=max(int(facts.disk_free_gb), 1),
            hypervisor=hypervisor,
        )
