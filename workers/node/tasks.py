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

NICs (``workers.node.network``): create, start and reboot wire the VM's NICs before QEMU starts (a
failed create removes them with the VM); delete removes them after QEMU is gone; stop keeps them.
``NODE_NETWORK_PEERS`` updates the overlay's peers.

Stored images (``workers.node.images``): every description's image gets this node's cache path; a
create on an image the cache lacks is answered by an image report "missing" instead of a VM report (the
control plane fetches it and sends the create again); the disk is made under the cache's lock.
"""

import logging
from collections.abc import Callable
from typing import Any, Unpack

from celery import Celery

from workers import contract
from workers.net.model import NetworkError
from workers.qemu import QemuDriver, QemuError, VmSpec, VmStatus

from .images import ImageCache, ImageMissing
from .network import NodeNetwork
from .reports import Reporter, vm_entry

logger = logging.getLogger(__name__)

TASK_OPTIONS: dict[str, Any] = {"acks_late": True, "reject_on_worker_lost": True, "time_limit": 600}


Work = Callable[[VmSpec, contract.VmDescription], VmStatus | None]


def register_tasks(
    app: Celery, driver: QemuDriver, reporter: Reporter, network: NodeNetwork, images: ImageCache
) -> None:
    """Bind the lifecycle tasks of ``workers.contract`` to this node's driver, data plane and images."""

    def run(operation: contract.Operation, vm: contract.VmDescription, work: Work) -> None:
        vm_id = str(vm.get("id", ""))
        vm = images.resolve(vm)
        try:
            spec = VmSpec.from_dict(vm)
        except QemuError as exc:
            reporter.vm(
                vm_id=vm_id, operation=operation, ok=False, state="error", reason=f"bad VM spec: {exc}"
            )
            return
        try:
            status = work(spec, vm)
        except ImageMissing as exc:
            reporter.image_fetch(
                fetch_id="", sha256=exc.sha256, event="missing", detail=str(exc), vm_id=vm_id
            )
            return
        except (QemuError, NetworkError) as exc:
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

    def create(spec: VmSpec, vm: contract.VmDescription) -> VmStatus:
        reporter.vm(vm_id=spec.uuid, operation="create", ok=True, state="provisioning", final=False)
        try:
            network.attach(spec.uuid, vm)  # restores what it found on failure: nothing, for a new VM
            with images.holding(vm):
                driver.create(spec)
            return driver.start(spec.uuid)
        except (QemuError, ImageMissing):
            # Leave nothing behind: the control plane records the error and releases the capacity.
            driver.delete(spec.uuid)
            try:
                network.detach(spec.uuid)
            except NetworkError:  # the create's own error is the one to report
                logger.exception("VM %s: its NICs could not be removed after a failed create", spec.uuid)
            raise

    def start(spec: VmSpec, vm: contract.VmDescription) -> VmStatus:
        images.touch_vm(vm)
        network.attach(spec.uuid, vm)
        return driver.start(spec.uuid)

    def stop(spec: VmSpec, vm: contract.VmDescription) -> VmStatus:
        return driver.stop(spec.uuid)

    def reboot(spec: VmSpec, vm: contract.VmDescription) -> VmStatus:
        network.attach(spec.uuid, vm)
        return driver.reboot(spec.uuid)

    def delete(spec: VmSpec, vm: contract.VmDescription) -> None:
        driver.delete(spec.uuid)  # deleting a VM this node does not hold is a no-op
        network.detach(spec.uuid)

    operations: dict[str, tuple[contract.Operation, Work]] = {
        contract.NODE_VM_CREATE: ("create", create),
        contract.NODE_VM_START: ("start", start),
        contract.NODE_VM_STOP: ("stop", stop),
        contract.NODE_VM_REBOOT: ("reboot", reboot),
        contract.NODE_VM_DELETE: ("delete", delete),
    }
    for task_name, (operation, work) in operations.items():
        app.task(name=task_name, **TASK_OPTIONS)(_bind(run, operation, work))
    app.task(name=contract.NODE_NETWORK_PEERS, **TASK_OPTIONS)(network.set_peers)


def _bind(
    run: Callable[[contract.Operation, contract.VmDescription, Work], None],
    operation: contract.Operation,
    work: Work,
) -> Callable[..., None]:
    def task(**request: Unpack[contract.VmOperationRequest]) -> None:
        vm = request["vm"]
        logger.info("%s VM %s (request %s)", operation, vm.get("id"), request.get("request_id", ""))
        run(operation, vm, work)

    task.__name__ = f"vm_{operation}"
    return task
