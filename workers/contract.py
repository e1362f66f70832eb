"""The message contract between the control plane and node workers.

Both sides name tasks and queues through these constants and nothing else: the control plane sends
node tasks by name (it never imports node code) and node workers send their reports to the control
queue by name (they never import Django). Payloads are JSON objects whose keys are listed here.
"""

from typing import Final

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

# Node VM states as reported (see workers.qemu.VmState): running, paused, stopped, dead, unknown.

# Redis keys written by nodes and read by the control side.
HEARTBEAT_KEY: Final = "novacron:node:{name}:heartbeat"  # JSON {"ts": epoch seconds, "vms": n}; with a TTL
METRICS_LIST: Final = "novacron:metrics"  # JSON samples [{"ts", "node", "vm"?, "name", "value"}], capped
METRICS_LIST_MAX: Final = 100_000  # a control plane that is down for a while loses the oldest samples
