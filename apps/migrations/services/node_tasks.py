"""What the control plane asks of nodes during a migration: one typed payload per node task.

Every task is sent after the surrounding transaction commits, to the node's own queue; its payload
is the contract's ``TypedDict`` for that task (``workers.contract``), which the node's task takes.
"""

from collections.abc import Mapping
from typing import Literal

from django.conf import settings
from django.db import transaction

from apps.core.conf import novacron_setting
from apps.core.errors import InvalidState
from apps.vms import dispatch
from apps.vms.choices import VMState
from apps.vms.models import Node
from workers import contract
from workers.dwcp import sign_ticket

from ..choices import MigrationMode
from ..models import Migration

_MODES: dict[str, contract.MigrationMode] = {MigrationMode.LIVE: "live", MigrationMode.COLD: "cold"}


def _send(node: Node | str, task: str, payload: Mapping[str, object]) -> None:
    name = node if isinstance(node, str) else node.name
    signature = dispatch.app.signature(task, kwargs=payload, queue=contract.node_queue(name))
    transaction.on_commit(signature.apply_async)


def _vm(migration: Migration) -> contract.VmDescription:
    # dispatch.vm_spec builds the contract's VmDescription, typed there as a plain dict.
    return dispatch.vm_spec(migration.vm)


def send_prepare(migration: Migration) -> None:
    """The destination prepares to receive (answered by "prepared" with its targets)."""
    payload: contract.MigrationPrepare = {
        "migration_id": str(migration.pk),
        "vm": _vm(migration),
        "mode": _MODES[migration.mode],
        "source_node": migration.source_node.name,
    }
    _send(migration.dest_node, contract.NODE_MIGRATION_PREPARE, payload)


def send_transfer(migration: Migration, targets: contract.Targets, tickets: contract.Tickets) -> None:
    """The source sends to the destination's ``targets`` (answered by "phase" and "transferred")."""
    payload: contract.MigrationSend = {
        "migration_id": str(migration.pk),
        "vm": _vm(migration),
        "mode": _MODES[migration.mode],
        "dest_node": migration.dest_node.name,
        "dest_dwcp_address": migration.dest_node.dwcp_address,
        "tickets": tickets,
        "targets": targets,
        "options": {
            "bandwidth_limit_mbps": migration.bandwidth_limit_mbps,
            "downtime_limit_ms": novacron_setting("MIGRATION_DOWNTIME_LIMIT_MS"),
            "auto_converge": True,
            "streams": novacron_setting("MIGRATION_STREAMS"),
        },
    }
    _send(migration.source_node, contract.NODE_MIGRATION_SEND, payload)


def tickets(migration: Migration, targets: contract.Targets) -> contract.Tickets:
    """A signed DWCP ticket for each target; InvalidState when the control plane has no DWCP secret."""
    secret = settings.DWCP_SECRET
    if not secret:
        raise InvalidState("DWCP_SECRET is not set on the control plane: no transfer can be authorised.")
    kind: Literal["file", "tunnel"] = "tunnel" if migration.mode == MigrationMode.LIVE else "file"
    return {
        name: sign_ticket(
            secret=secret,
            source_node=migration.source_node.name,
            dest_node=migration.dest_node.name,
            kind=kind,
            target=target,
            transfer_id=f"{migration.pk}-{name}",
            ttl_seconds=novacron_setting("MIGRATION_TICKET_TTL"),
        )
        for name, target in targets.items()
    }


def send_finish(migration: Migration) -> None:
    """Cold: the destination defines the VM around the received disk, started if it ran before."""
    payload: contract.MigrationFinish = {
        "migration_id": str(migration.pk),
        "vm": _vm(migration),
        "start": migration.vm_state_before == VMState.RUNNING,
    }
    _send(migration.dest_node, contract.NODE_MIGRATION_FINISH, payload)


def send_abort(migration: Migration, role: contract.Role, *, node: Node | None = None) -> None:
    """One side removes what it holds of the migration (answered by "aborted").

    The source is told to restart the VM if it ran before the migration. ``node``: send it to a node
    that is not the migration's (a leftover copy), by default the side's own.
    """
    payload: contract.MigrationAbort = {"migration_id": str(migration.pk), "vm": _vm(migration), "role": role}
    if role == "source":
        payload["restart"] = migration.vm_state_before == VMState.RUNNING
    side = migration.source_node if role == "source" else migration.dest_node
    _send(node or side, contract.NODE_MIGRATION_ABORT, payload)


def send_cleanup(migration: Migration, *, node: Node | None = None) -> None:
    """The source removes its copy after the switch (answered by "cleaned")."""
    payload: contract.MigrationCleanup = {"migration_id": str(migration.pk), "vm": _vm(migration)}
    _send(node or migration.source_node, contract.NODE_MIGRATION_CLEANUP, payload)


def send_leftovers(node: str, ended: list[contract.MigrationCopy]) -> None:
    """A starting node removes the destination copies of migrations that ended (``ended``)."""
    payload: contract.MigrationLeftovers = {"ended": ended}
    _send(node, contract.NODE_MIGRATION_LEFTOVERS, payload)
