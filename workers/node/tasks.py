"""The node's Celery tasks: VM lifecycle operations, each idempotent and reported to the control queue.

Delivery: at least once. Tasks are acknowledged after they ran (``acks_late``), and the driver's
operations are idempotent by VM uuid (no second disk, no second QEMU), so running one twice converges.
What brings a lost task back depends on how it was lost:

- the worker's broker connection dropped while it ran: kombu puts the message back on the queue at
  once, and it runs again;
- the worker was killed (SIGKILL, host crash): with the thread pool nothing survives to notice, and the
  Redis transport redelivers only after ``CELERY_VISIBILITY_TIMEOUT`` (6 h, sized for migrations). The
  prompt path is reconciliation instead: at start the worker sends every VM it holds
  (``complete=True``) and the control side re-sends the create of a VM still pending/provisioning and
  settles a VM whose start/stop/reboot was in flight (``pending_action``) to the state the node observes,
  clearing the pending action (``apps.vms.services.reports.node_apply_vm_states``). A node that never
  comes back is marked down after ``NODE_HEARTBEAT_TIMEOUT``: its VMs go to ``error`` ("state unknown
  until it returns") and keep their pending action, so no other action is accepted for them meanwhile.
"""

import logging
from collections.abc import Callable
from typing import Any, Unpack

from celery import Celery

from workers import contract
from workers.qemu import QemuDriver, QemuError, VmSpec, VmStatus

from .reports import Reporter, vm_entry

logger = logging.getLogger(__name__)

TASK_OPTIONS: dict[str, Any] = {"acks_late": True, "reject_on_worker_lost": True, "time_limit": 600}


def register_tasks(app: Celery, driver: QemuDriver, reporter: Reporter) -> None:
    """Bind the lifecycle tasks of ``workers.contract`` to this node's driver."""

    def run(
        operation: contract.Operation, vm: contract.VmDescription, work: Callable[[VmSpec], VmStatus | None]
    ) -> None:
        vm_id = str(vm.get("id", ""))
        try:
            spec = VmSpec.from_dict(vm)
        except QemuError as exc:
            reporter.vm(
                vm_id=vm_id, operation=operation, ok=False, state="error", reason=f"bad VM spec: {exc}"
            )
            return
        try:
            status = work(spec)
        except QemuError as exc:
            reporter.vm(vm_id=spec.uuid, operation=operation, ok=False, state="error", reason=str(exc))
            return
        except Exception as exc:
            logger.exception("VM %s: %s failed unexpectedly", spec.uuid, operation)
            reporter.vm(
                vm_id=spec.uuid, operation=operation, ok=False, state="error", reason=f"node error: {exc!r}"
            )
            return
        if status is None:
            reporter.vm(vm_id=spec.uuid, operation=operation, ok=True, state="deleted")
        else:
            entry = vm_entry(status)
            ok = entry["state"] != "error"
            reporter.vm(
                vm_id=spec.uuid, operation=operation, ok=ok, state=entry["state"], reason=entry["reason"]
            )

    def create(spec: VmSpec) -> VmStatus:
        reporter.vm(vm_id=spec.uuid, operation="create", ok=True, state="provisioning", final=False)
        try:
            driver.create(spec)
            return driver.start(spec.uuid)
        except QemuError:
            # Leave nothing behind: the control plane records the error and releases the capacity.
            driver.delete(spec.uuid)
            raise

    def start(spec: VmSpec) -> VmStatus:
        return driver.start(spec.uuid)

    def stop(spec: VmSpec) -> VmStatus:
        return driver.stop(spec.uuid)

    def reboot(spec: VmSpec) -> VmStatus:
        return driver.reboot(spec.uuid)

    def delete(spec: VmSpec) -> None:
        driver.delete(spec.uuid)  # deleting a VM this node does not hold is a no-op

    operations: dict[str, tuple[contract.Operation, Callable[[VmSpec], VmStatus | None]]] = {
        contract.NODE_VM_CREATE: ("create", create),
        contract.NODE_VM_START: ("start", start),
        contract.NODE_VM_STOP: ("stop", stop),
        contract.NODE_VM_REBOOT: ("reboot", reboot),
        contract.NODE_VM_DELETE: ("delete", delete),
    }
    for task_name, (operation, work) in operations.items():
        app.task(name=task_name, **TASK_OPTIONS)(_bind(run, operation, work))


def _bind(
    run: Callable[[contract.Operation, contract.VmDescription, Callable[[VmSpec], VmStatus | None]], None],
    operation: contract.Operation,
    work: Callable[[VmSpec], VmStatus | None],
) -> Callable[..., None]:
    def task(**request: Unpack[contract.VmOperationRequest]) -> None:
        vm = request["vm"]
        logger.info("%s VM %s (request %s)", operation, vm.get("id"), request.get("request_id", ""))
        run(operation, vm, work)

    task.__name__ = f"vm_{operation}"
    return task
