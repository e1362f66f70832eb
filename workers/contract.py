"""The message contract between the control plane and node workers.

Both sides name tasks and queues through these constants and nothing else: the control plane sends
node tasks by name (it never imports node code) and node workers send their reports to the control
queue by name (they never import Django). Payloads are JSON objects whose keys are listed here.
"""

from typing import Final, Literal, TypedDict

CONTROL_QUEUE: Final = "control"


def node_queue(node_name: str) -> str:
    """The Celery queue a node's worker consumes."""
    return f"node.{node_name}"


# Node tasks: kwargs {"vm": VM spec (see VM_SPEC_KEYS), "request_id": str}.
NODE_VM_CREATE: Final = "novacron.node.vm_create"
NODE_VM_START: Final = "novacron.node.vm_start"
NODE_VM_STOP: Final = "novacron.node.vm_stop"
NODE_VM_REBOOT: Final = "novacron.node.vm_reboot"
NODE_VM_DELETE: Final = "novacron.node.vm_delete"

VM_SPEC_KEYS: Final = (
    "id",
    "name",
    "vcpus",
    "memory_mb",
    "disk_gb",
    "image",  # {"name", "kind", "format", "path", "kernel_path", "initrd_path", "cmdline"}
)

# Control tasks sent by nodes.
# kwargs {"vm_id", "operation": one of OPERATIONS, "ok": bool, "state": str, "reason": str, "node": str,
#         "final": bool (False for "work has started" reports)}
CONTROL_VM_REPORT: Final = "novacron.control.vm_report"
# kwargs {"name", "address", "dwcp_address", "vcpus", "memory_mb", "disk_gb", "hypervisor": {...}}
CONTROL_NODE_REGISTER: Final = "novacron.control.node_register"
# kwargs {"node": str, "vms": [{"id", "state", "reason"}], "complete": bool}. Sent at start with every VM
# the node holds (complete=True: the control side reconciles) and whenever a VM's state changes by
# itself (a QEMU that died, a guest that powered off).
CONTROL_NODE_VM_STATES: Final = "novacron.control.node_vm_states"

OPERATIONS: Final = ("create", "start", "stop", "reboot", "delete")

# --- Migrations -----------------------------------------------------------------------------------
# Node tasks; every kwargs has "migration_id" and "vm" (VM spec). Roles: the source node sends, the
# destination node receives; both report with CONTROL_MIGRATION_REPORT.
# dest: {"mode", "source_node"} -> event "prepared" {"targets": {"disk": ..., "memory": ...}}
NODE_MIGRATION_PREPARE: Final = "novacron.node.migration_prepare"
# source: {"mode", "dest_node", "dest_dwcp_address", "tickets": {name: token}, "targets", "options"}
#   -> event "transferred" with stats (live: QEMU completed, source paused; cold: disk sent, verified)
NODE_MIGRATION_SEND: Final = "novacron.node.migration_send"
# dest (cold only): {"start": bool} -> event "switched" once the VM is defined (and started)
NODE_MIGRATION_FINISH: Final = "novacron.node.migration_finish"
# either: {"role"} -> event "aborted": QEMU and files of this migration removed on that side
NODE_MIGRATION_ABORT: Final = "novacron.node.migration_abort"
# source after the switch: -> event "cleaned": source QEMU quit, disk and run files removed
NODE_MIGRATION_CLEANUP: Final = "novacron.node.migration_cleanup"
# kwargs {"migration_id", "node", "role": "source" | "dest", "event", "detail": str, "stats": {...},
#         "targets"?: {...}, "cause"?: FailureCause (event "failed" only; default "error")}.
# Events: prepared, phase, transferred, switched, failed, cancelled, aborted, cleaned, kept (a leftover
# copy this node did not remove: the detail says why).
CONTROL_MIGRATION_REPORT: Final = "novacron.control.migration_report"

# How first-hand a "failed" report's detail is. Both sides can report one failure and in either order
# (the destination's measured memory mismatch, and the source resuming because it was told of it): the
# migration's error is the detail of the highest-ranked cause, the first of equals; every report stays
# in its history.
#   relayed: this node fails because the other side told it to (it can only repeat the verdict);
#   error: something failed here (the default);
#   measured: a check here measured the fault (its detail holds the figures).
FailureCause = Literal["relayed", "error", "measured"]
FAILURE_CAUSES: Final[tuple[FailureCause, ...]] = ("relayed", "error", "measured")  # lowest rank first


class MigrationCopy(TypedDict):
    """A copy of a VM this node holds for a migration, as its migration marker records it."""

    migration_id: str
    vm_id: str
    role: Literal["source", "dest"]


# A node worker that starts lists the destination copies its migration markers name (QEMUs left waiting
# with -incoming defer, half-received disks), since it cannot tell which of their migrations still run:
# kwargs {"node": str, "copies": [MigrationCopy]}. The control plane answers with
# NODE_MIGRATION_LEFTOVERS {"ended": [MigrationCopy]}: the copies whose migration is no longer active
# (failed, cancelled, or unknown to it). The node removes an ended copy only while its marker still
# names that migration and its guest never ran there; a copy of an active migration is never listed.
CONTROL_MIGRATION_COPIES: Final = "novacron.control.migration_copies"
NODE_MIGRATION_LEFTOVERS: Final = "novacron.node.migration_leftovers"

# Live progress, written by the source node at least twice a second while it transfers.
MIGRATION_PROGRESS_KEY: Final = "novacron:migration:{id}:progress"  # hash; see MIGRATION_PROGRESS_FIELDS
MIGRATION_EVENTS_CHANNEL: Final = "novacron:migration:{id}:events"  # pub/sub: the same fields as JSON
MIGRATION_PROGRESS_FIELDS: Final = (
    "phase",
    "percent",
    "memory_total",
    "memory_processed",
    "memory_remaining",
    "dirty_rate",
    "disk_total",
    "disk_processed",
    "disk_remaining",
    "wire_bytes",
    "rate_bps",
    "eta_seconds",
    "updated",
)
# Control knobs the source polls while it transfers (a hash):
# "bandwidth_limit_mbps", "cancel", "force_complete".
MIGRATION_CONTROL_KEY: Final = "novacron:migration:{id}:control"

# Node VM states as reported (see workers.qemu.VmState): running, paused, stopped, dead, unknown.

# Redis keys written by nodes and read by the control side.
# JSON {"ts": epoch seconds, "vms": [workers.node.reports.vm_entry(...)...], "partial": [VM ids of half-made
# copies without a definition]}; with a TTL.
HEARTBEAT_KEY: Final = "novacron:node:{name}:heartbeat"
METRICS_LIST: Final = "novacron:metrics"  # JSON samples [{"ts", "node", "vm"?, "name", "value"}], capped
METRICS_LIST_MAX: Final = 100_000  # a control plane that is down for a while loses the oldest samples
