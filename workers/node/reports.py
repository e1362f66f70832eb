"""What a node tells the control plane: task outcomes, VM state changes, registration.

Every report is a task on the control queue, named in ``workers.contract``; the control worker
applies it idempotently, so a report sent twice (a redelivered node task) changes nothing.
"""

import logging
from collections.abc import Mapping
from typing import Any

from celery import Celery

from workers import contract
from workers.qemu import VmState, VmStatus

logger = logging.getLogger(__name__)

# How a node-side VM state goes on the wire: as the node names it, and as the control plane records it.
STATES_ON_WIRE: dict[VmState, tuple[contract.NodeVmState, contract.ControlVmState]] = {
    VmState.RUNNING: ("running", "running"),
    VmState.PAUSED: ("paused", "running"),
    VmState.STOPPED: ("stopped", "stopped"),
    VmState.DEAD: ("dead", "error"),
    VmState.UNKNOWN: ("unknown", "error"),
}


def vm_entry(status: VmStatus) -> contract.VmStateEntry:
    """One VM as the control side reconciles it."""
    reason = status.reason
    if status.state in (VmState.DEAD, VmState.UNKNOWN) and status.serial_tail:
        reason = f"{reason}; last console lines: {' | '.join(status.serial_tail[-3:])}"
    node_state, control_state = STATES_ON_WIRE[status.state]
    return {"id": status.uuid, "state": control_state, "node_state": node_state, "reason": reason}


class Reporter:
    """Sends reports from one node to the control queue."""

    def __init__(self, app: Celery, node: str) -> None:
        self.app = app
        self.node = node

    def _send(self, task: str, payload: Mapping[str, Any]) -> None:
        self.app.send_task(task, kwargs=dict(payload), queue=contract.CONTROL_QUEUE)

    def vm(
        self,
        *,
        vm_id: str,
        operation: contract.Operation,
        ok: bool,
        state: contract.ReportedVmState,
        reason: str = "",
        final: bool = True,
    ) -> None:
        logger.info("VM %s %s: ok=%s state=%s %s", vm_id, operation, ok, state, reason)
        report: contract.VmReport = {
            "vm_id": vm_id,
            "operation": operation,
            "ok": ok,
            "state": state,
            "reason": reason[:1000],
            "node": self.node,
            "final": final,
        }
        self._send(contract.CONTROL_VM_REPORT, report)

    def vm_states(self, statuses: list[VmStatus], *, complete: bool) -> None:
        states: contract.NodeVmStates = {
            "node": self.node,
            "vms": [vm_entry(status) for status in statuses],
            "complete": complete,
        }
        self._send(contract.CONTROL_NODE_VM_STATES, states)

    def image_fetch(
        self,
        *,
        fetch_id: str,
        sha256: str,
        event: contract.ImageFetchEvent,
        percent: float | None = None,
        detail: str = "",
        vm_id: str = "",
    ) -> None:
        logger.info("image %s fetch %s: %s %s", sha256, fetch_id, event, detail)
        report: contract.ImageFetchReport = {
            "fetch_id": fetch_id,
            "node": self.node,
            "sha256": sha256,
            "event": event,
            "detail": detail[:500],
        }
        if percent is not None:
            report["percent"] = percent
        if vm_id:
            report["vm_id"] = vm_id
        self._send(contract.CONTROL_IMAGE_FETCH_REPORT, report)

    def images(self, images: list[contract.CachedImage], *, over_limit: str = "") -> None:
        listing: contract.NodeImages = {"node": self.node, "images": images, "over_limit": over_limit}
        self._send(contract.CONTROL_NODE_IMAGES, listing)

    def register(
        self,
        *,
        address: str,
        dwcp_address: str,
        facts: contract.HypervisorFacts,
        vxlan_port: int = contract.VXLAN_PORT,
        networking: str = "",
    ) -> None:
        registration: contract.NodeRegistration = {
            "name": self.node,
            "address": address,
            "dwcp_address": dwcp_address,
            "vcpus": facts["cpu_count"],
            "memory_mb": facts["memory_mb"],
            "disk_gb": max(int(facts["disk_free_gb"]), 1),
            "hypervisor": facts,
            "vxlan_port": vxlan_port,
            "networking": networking,  # "" when this node can attach NICs, else why not
        }
        self._send(contract.CONTROL_NODE_REGISTER, registration)
