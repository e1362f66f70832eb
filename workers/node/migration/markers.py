"""Migration markers: which migration and which role a copy of a VM on this node belongs to.

A ``migration.json`` in the VM's run directory is written when a prepare (destination) or send
(source) starts. Every step that removes something checks it first, so an abort or cleanup never
removes a VM this node legitimately runs, and a task delivered twice is told apart from a new one.
"""

import json
import logging
from pathlib import Path
from typing import TypedDict

from workers import contract
from workers.qemu import QemuDriver

logger = logging.getLogger(__name__)

MARKER = "migration.json"


class Marker(TypedDict):
    migration_id: str
    role: contract.Role


class Markers:
    """The migration markers of one node's VMs."""

    def __init__(self, driver: QemuDriver) -> None:
        self.driver = driver

    def path(self, uuid: str) -> Path:
        return self.driver.paths(uuid).run_dir / MARKER

    def write(self, uuid: str, migration_id: str, role: contract.Role) -> None:
        marker: Marker = {"migration_id": migration_id, "role": role}
        path = self.path(uuid)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.write_text(json.dumps(marker))

    def remove(self, uuid: str) -> None:
        self.path(uuid).unlink(missing_ok=True)

    def read(self, uuid: str) -> dict[str, object] | None:
        """The marker of ``uuid`` as written (None: none, or unreadable)."""
        try:
            data = json.loads(self.path(uuid).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def role(self, uuid: str) -> str | None:
        """The role the marker gives this node's copy of ``uuid`` (None: no marker)."""
        role = (self.read(uuid) or {}).get("role")
        return role if isinstance(role, str) else None

    def names(self, uuid: str, migration_id: str, role: contract.Role) -> bool:
        """Whether this node's copy of ``uuid`` is the ``role`` copy of that migration."""
        data = self.read(uuid)
        return data is not None and data.get("migration_id") == migration_id and data.get("role") == role

    def redelivered(self, uuid: str, migration_id: str, role: contract.Role) -> bool:
        """Whether this prepare/send already started here once: then it must not run again.

        Migration tasks run at most once per node. They are ``acks_late`` without
        ``reject_on_worker_lost``, but the broker can still hand one out twice: when the worker's
        broker connection drops while the task runs, kombu puts the unacknowledged message back on
        the queue (found by the fault test 'Redis restarted during a live migration'). A second send
        of a completed live migration would resume the paused source beside the running destination.
        The marker written when the task started tells a repeat apart; what the first run did is
        settled by its own reports or, if it died, by the watchdog and the abort that follows.
        """
        if not self.names(uuid, migration_id, role):
            return False
        logger.warning("migration %s (%s): task delivered again; not running it twice", migration_id, role)
        return True

    def destination_copies(self) -> list[contract.MigrationCopy]:
        """The destination copies the markers name (prepared here, never switched here)."""
        copies: list[contract.MigrationCopy] = []
        for uuid in self.driver.layout.vm_uuids():
            data = self.read(uuid)
            if data is not None and data.get("role") == "dest" and data.get("migration_id"):
                copies.append({"migration_id": str(data["migration_id"]), "vm_id": uuid, "role": "dest"})
        return copies
