"""Destination copies left behind by migrations that ended while this node's worker was down.

A worker that starts cannot tell an active migration from one that ended meanwhile (its abort lost or
never sent): it lists the destination copies its markers name to the control plane, which answers
with those whose migration ended. Such a copy is removed only while its marker still names that
migration and its guest never ran here; otherwise it is kept and reported ("kept") for an operator.
"""

import logging

from workers import contract
from workers.qemu import QemuError

from .context import NodeMigrations
from .destination import remove_copy

logger = logging.getLogger(__name__)

# QEMU run states of a destination whose guest never ran there: waiting for (or receiving) its incoming
# migration, or not started. Only such a copy is removed as a leftover without an operator.
NEVER_RAN_QEMU_STATES = frozenset({"inmigrate", "prelaunch"})


class Leftovers:
    def __init__(self, node: NodeMigrations) -> None:
        self.node = node
        self.driver = node.driver

    def report_copies(self) -> None:
        """At start: ask the control plane which of this node's destination copies are leftovers."""
        copies = self.node.markers.destination_copies()
        if not copies:
            return
        logger.info(
            "node %s holds %d destination copies; asking which are leftovers",
            self.node.config.name,
            len(copies),
        )
        request: contract.MigrationCopies = {"node": self.node.config.name, "copies": copies}
        self.node.app.send_task(
            contract.CONTROL_MIGRATION_COPIES, kwargs=dict(request), queue=contract.CONTROL_QUEUE
        )

    def remove(self, answer: contract.MigrationLeftovers) -> None:
        """Remove the destination copies whose migration the control plane says is no longer active.

        Only while the copy's marker still names that migration (a later migration of the VM here made
        it its own) and its guest never ran here: a QEMU still waiting for its incoming migration, or
        none at all. A copy whose guest ran (paused, running) may be the VM's only one: it is kept and
        reported ("kept") for an operator.
        """
        for copy in answer["ended"]:
            uuid, migration_id = copy["vm_id"], copy["migration_id"]
            with self.node.vm_lock(uuid):
                if not self.node.markers.names(uuid, migration_id, "dest"):
                    continue
                try:
                    kept = self._guest_ran_here(uuid)
                    if not kept:
                        remove_copy(self.node, uuid)
                except (QemuError, OSError) as exc:
                    kept = f"it could not be removed: {exc}"
                if kept:
                    logger.warning(
                        "VM %s: leftover destination copy of %s kept: %s", uuid, migration_id, kept
                    )
                    self.node.report(migration_id, "dest", "kept", f"leftover destination copy kept: {kept}")
                else:
                    detail = "leftover destination copy removed when the node worker started"
                    self.node.report(migration_id, "dest", "aborted", detail)

    def _guest_ran_here(self, uuid: str) -> str:
        """Why the copy's guest may have run here; '' when it cannot (it never left its incoming wait)."""
        if not self.driver.paths(uuid).spec.exists():
            return ""  # no VM defined: a half-received disk
        status = self.driver.status(uuid)
        if status.pid is None or status.qemu_status in NEVER_RAN_QEMU_STATES:
            return ""
        return f"its QEMU is {status.qemu_status or status.state}"
