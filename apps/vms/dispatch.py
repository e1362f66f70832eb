"""Sending work to node queues: always after the surrounding transaction commits.

The control plane names node tasks through ``workers.contract`` and never imports node code.
"""

import uuid
from collections.abc import Iterable
from typing import Any, Literal

from celery import group
from django.db import transaction

from apps.networks.nics import nic_descriptions
from novacron.celery import app
from workers import contract

from . import cloud_init
from .choices import ImageKind
from .models import VM


def vm_spec(vm: VM) -> contract.VmDescription:
    """The VM description a node needs to create and run it (``contract.VmDescription``)."""
    image = vm.image
    kind: Literal["disk", "kernel"] = "kernel" if image.kind == ImageKind.KERNEL else "disk"
    description: contract.VmDescription = {
        "id": str(vm.id),
        "name": vm.name,
        "vcpus": vm.vcpus,
        "memory_mb": vm.memory_mb,
        "disk_gb": vm.disk_gb,
        "image": {
            "name": image.name,
            "kind": kind,
            "format": image.format,
            "path": image.path,
            "kernel_path": image.kernel_path,
            "initrd_path": image.initrd_path,
            "cmdline": image.cmdline,
            "sha256": image.sha256,
            "size_bytes": image.size_bytes,
        },
        # In guest order; prefetched for a batch (``apps.networks.selectors.NICS_PREFETCH``).
        "nics": nic_descriptions(vm),
    }
    # A cloud-init seed for disk images (cloud images look for one) and for any VM given seed data;
    # none for a kernel image booted without any (the test guest runs no cloud-init).
    if image.kind == ImageKind.DISK or vm.ssh_keys or vm.user_data:
        description["seed"] = {
            "hostname": vm.hostname or cloud_init.hostname_for(vm.name),
            "ssh_keys": list(vm.ssh_keys),
            "user_data": vm.user_data,
        }
    return description


def _signature(vm: VM, task_name: str, node_name: str | None = None) -> Any:
    if node_name is None:
        assert vm.node is not None, "only VMs placed on a node get node tasks"
        node_name = vm.node.name
    request_id = uuid.uuid4().hex
    return app.signature(
        task_name,
        kwargs={"vm": vm_spec(vm), "request_id": request_id},
        queue=contract.node_queue(node_name),
        # What Flower shows of the arguments: Celery's own repr of the spec (image paths, kernel
        # command line) was long and cost a safe-repr walk of it per message.
        argsrepr="()",
        kwargsrepr=f"{{'vm': '{vm.name}' ({vm.id}), 'request_id': '{request_id}'}}",
    )


def send_on_commit(vm: VM, task_name: str) -> None:
    """Send one node task for ``vm`` once the current transaction commits."""
    signature = _signature(vm, task_name)
    transaction.on_commit(signature.apply_async)


def send_to_node_on_commit(node_name: str, vm: VM, task_name: str) -> None:
    """Send a node task for ``vm`` to a node it is not recorded on (cleaning up a leftover copy)."""
    transaction.on_commit(_signature(vm, task_name, node_name).apply_async)


def send_group(vms: Iterable[VM], task_name: str) -> None:
    """Send one task per VM to each VM's node queue, as one Celery group (called outside transactions)."""
    signatures = [_signature(vm, task_name) for vm in vms]
    if signatures:
        group(signatures).apply_async()
