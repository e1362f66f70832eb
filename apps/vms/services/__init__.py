"""Writes to the fleet, by entity: VM requests (``vms``), node reports (``reports``), nodes."""

from .nodes import node_delete, node_register
from .reports import batch_update_status, node_apply_vm_states, nodes_check_heartbeats, vm_record_report
from .vms import (
    VMChanges,
    VMRequest,
    vm_batch_create,
    vm_batch_delete,
    vm_batch_update,
    vm_create,
    vm_delete,
    vm_rename,
    vm_request_action,
    vm_update,
)

__all__ = [
    "VMChanges",
    "VMRequest",
    "batch_update_status",
    "node_apply_vm_states",
    "node_delete",
    "node_register",
    "nodes_check_heartbeats",
    "vm_batch_create",
    "vm_batch_delete",
    "vm_batch_update",
    "vm_create",
    "vm_delete",
    "vm_record_report",
    "vm_rename",
    "vm_request_action",
    "vm_update",
]
