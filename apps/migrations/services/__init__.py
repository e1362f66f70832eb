"""Writes to migrations, by step: ``requests``, ``scheduling``, node ``reports`` (the reducer table),
operator ``control``, the stall ``watchdog``, ``leftovers`` copies and node ``drain``; ``state`` holds
the status table and history, ``outcomes`` how a migration ends, ``node_tasks`` what nodes are sent.

States: queued -> preparing -> transferring (phases disk, memory) -> switching -> completed, or
failed / cancelled, both rolled back (the VM stays on its source, the destination's reservation is
released and its half-made copy removed). Every transition is recorded as a MigrationEvent.
"""

from ..choices import TERMINAL_STATUSES
from .control import migration_cancel, migration_force_complete, migration_set_bandwidth
from .drain import node_drain
from .leftovers import (
    MIGRATION_LEFTOVER_GRACE_SECONDS,
    MIGRATION_LEFTOVER_MAX_RESENDS,
    node_clean_migration_leftovers,
    node_migration_copies,
)
from .reports import migration_report
from .requests import migration_request
from .scheduling import migrations_schedule
from .watchdog import migrations_watchdog, switching_decision

__all__ = [
    "MIGRATION_LEFTOVER_GRACE_SECONDS",
    "MIGRATION_LEFTOVER_MAX_RESENDS",
    "TERMINAL_STATUSES",
    "migration_cancel",
    "migration_force_complete",
    "migration_report",
    "migration_request",
    "migration_set_bandwidth",
    "migrations_schedule",
    "migrations_watchdog",
    "node_clean_migration_leftovers",
    "node_drain",
    "node_migration_copies",
    "switching_decision",
]
