"""What both roles of a migration share on one node: its settings, driver, Redis, markers, reports.

Every step runs ``guarded``: whatever it raises becomes the step's "cancelled" or "failed" report,
so the control plane always hears how a step ended. Steps that create or remove a VM's files here
hold that VM's lock (``vm_lock``).
"""

import logging
import threading
from collections.abc import Callable

import redis
from celery import Celery

from workers import contract
from workers.dwcp import DWCPError
from workers.dwcp.errors import TransferInterrupted
from workers.qemu import Accelerator, QemuDriver, QemuError

from ..config import NodeConfig
from ..network import NodeNetwork
from .markers import Markers
from .memory_check import MemoryMismatch
from .transfer import MigrationAborted

logger = logging.getLogger(__name__)

DETAIL_MAX_CHARS = 2000  # what the control side keeps of a detail


class NodeMigrations:
    """One node's share of migrations: configuration, driver, Redis, markers, reports and VM locks."""

    def __init__(
        self,
        config: NodeConfig,
        driver: QemuDriver,
        app: Celery,
        client: redis.Redis,
        network: NodeNetwork | None = None,
    ) -> None:
        self.config = config
        self.driver = driver
        self.network = network or NodeNetwork(config)
        self.app = app
        self.redis = client
        self.markers = Markers(driver)
        self._lock = threading.Lock()
        # One lock per VM for the short steps that create or remove its files here (prepare, abort,
        # cleanup): a ping-pong migration's prepare and the cleanup of the move before it can run at
        # once on the same node, and the cleanup removed the new copy's disk (seen once in the soak).
        self._vm_locks: dict[str, threading.RLock] = {}

    def vm_lock(self, uuid: str) -> threading.RLock:
        with self._lock:
            return self._vm_locks.setdefault(uuid, threading.RLock())

    def verifies_memory(self) -> bool:
        """Whether this node checks the guest's RAM at a live switch (its setting; auto: under TCG)."""
        setting = self.config.verify_memory
        return setting == "on" or (setting == "auto" and self.driver.accelerator is Accelerator.TCG)

    def report(
        self,
        migration_id: str,
        role: contract.Role,
        event: contract.ReportEvent,
        detail: str = "",
        *,
        stats: contract.MigrationStats | None = None,
        targets: contract.Targets | None = None,
        cause: contract.FailureCause | None = None,
    ) -> None:
        logger.info("migration %s (%s): %s %s", migration_id, role, event, detail)
        report: contract.MigrationReport = {
            "migration_id": migration_id,
            "node": self.config.name,
            "role": role,
            "event": event,
            "detail": detail[:DETAIL_MAX_CHARS],
        }
        if stats is not None:
            report["stats"] = stats
        if targets is not None:
            report["targets"] = targets
        if cause is not None:
            report["cause"] = cause
        self.app.send_task(
            contract.CONTROL_MIGRATION_REPORT, kwargs=dict(report), queue=contract.CONTROL_QUEUE
        )

    def guarded(self, migration_id: str, role: contract.Role, work: Callable[[], None]) -> None:
        """Run one step; report how it ended if it raised."""
        try:
            work()
        except MigrationAborted as exc:
            self.report(migration_id, role, "cancelled", str(exc))
        except (QemuError, DWCPError, OSError, redis.RedisError) as exc:
            logger.exception("migration %s (%s) failed", migration_id, role)
            detail = f"{type(exc).__name__}: {exc}"
            self.report(migration_id, role, "failed", detail, cause=failure_cause(exc))
        except Exception as exc:
            logger.exception("migration %s (%s) failed unexpectedly", migration_id, role)
            self.report(migration_id, role, "failed", f"node error: {exc!r}")


def failure_cause(exc: Exception) -> contract.FailureCause:
    """How first-hand a failure is: a memory check's verdict is measured; a transfer the connection
    cut (the peer gave up, its disk filled, the link died) only relays what the other side knows."""
    if isinstance(exc, MemoryMismatch):
        return exc.cause
    return "relayed" if isinstance(exc, TransferInterrupted) else "error"
