"""The node's migration tasks: each entry of ``workers.contract`` handed to the role it concerns.

Tasks take the contract's payloads (``Unpack``) and run at most once per node: a migration step must
not run twice (a second send of a completed live migration would resume the handed-over source).
``reject_on_worker_lost`` is off and prepare/send check their marker against a redelivery; a step lost
with its worker is settled by the control side's watchdog (MIGRATION_STALL_TIMEOUT) and the abort
that follows.
"""

from typing import Any, Unpack

import redis
from celery import Celery, signals

from workers import contract
from workers.qemu import QemuDriver

from ..config import NodeConfig
from ..images import ImageCache, ImageMissing, ImageRefused
from ..network import NodeNetwork
from .context import NodeMigrations
from .destination import Destination
from .leftovers import Leftovers
from .qmp_steps import MIGRATE_TIMEOUT
from .source import Source


class MigrationRunner:
    """Runs the migration tasks of one node."""

    def __init__(
        self,
        config: NodeConfig,
        driver: QemuDriver,
        app: Celery,
        client: redis.Redis,
        network: NodeNetwork | None = None,
        *,
        images: ImageCache | None = None,
    ) -> None:
        node = NodeMigrations(config, driver, app, client, network)
        self.node = node
        self.driver = driver
        self.images = images
        self.source = Source(node)
        self.destination = Destination(node)
        self.leftovers = Leftovers(node)

    def _resolved(self, vm: contract.VmDescription) -> contract.VmDescription:
        """``vm`` with its stored image's base in this node's cache (touched: a use)."""
        if self.images is None:
            return vm
        self.images.touch_vm(vm)
        return self.images.resolve(vm)

    def _unpin(self, vm: contract.VmDescription) -> None:
        sha256 = str(vm.get("image", {}).get("sha256") or "")
        if self.images is not None and sha256:
            self.images.unpin(sha256)

    def prepare(self, **request: Unpack[contract.MigrationPrepare]) -> None:
        request["vm"] = self._resolved(request["vm"])
        self.destination.prepare(request)
        if request["mode"] == "live":
            self._unpin(request["vm"])  # the incoming QEMU's disk is made on it

    def send(self, **request: Unpack[contract.MigrationSend]) -> None:
        request["vm"] = self._resolved(request["vm"])
        self.source.send(request)

    def finish(self, **request: Unpack[contract.MigrationFinish]) -> None:
        request["vm"] = self._resolved(request["vm"])
        paths = self.driver.paths(request["vm"]["id"])
        if self.images is not None and not paths.spec.exists():
            # The received overlay names the source's cache file as its base: point it at this node's.
            try:
                self.images.rebase(self.driver.tools.img, paths.disk, request["vm"])
            except (ImageMissing, ImageRefused) as exc:
                self.node.report(request["migration_id"], "dest", "failed", str(exc))
                return
        self.destination.finish(request)
        self._unpin(request["vm"])

    def abort(self, **request: Unpack[contract.MigrationAbort]) -> None:
        request["vm"] = self._resolved(request["vm"])
        if request["role"] == "source":
            self.source.abort(request)
        else:
            self.destination.abort(request)

    def cleanup(self, **request: Unpack[contract.MigrationCleanup]) -> None:
        request["vm"] = self._resolved(request["vm"])
        self.source.cleanup(request)

    def report_copies(self) -> None:
        self.leftovers.report_copies()

    def remove_leftovers(self, **answer: Unpack[contract.MigrationLeftovers]) -> None:
        self.leftovers.remove(answer)


def register_migration_tasks(app: Celery, runner: MigrationRunner) -> None:
    """Bind the migration tasks of ``workers.contract`` to this node."""
    options: dict[str, Any] = {
        "acks_late": True,
        "reject_on_worker_lost": False,
        "time_limit": int(MIGRATE_TIMEOUT) + 600,
    }
    app.task(name=contract.NODE_MIGRATION_PREPARE, **options)(runner.prepare)
    app.task(name=contract.NODE_MIGRATION_SEND, **options)(runner.send)
    app.task(name=contract.NODE_MIGRATION_FINISH, **options)(runner.finish)
    app.task(name=contract.NODE_MIGRATION_ABORT, **options)(runner.abort)
    app.task(name=contract.NODE_MIGRATION_CLEANUP, **options)(runner.cleanup)
    app.task(name=contract.NODE_MIGRATION_LEFTOVERS, **options)(runner.remove_leftovers)
    # Once the worker consumes its queue, so that the answer is taken as soon as it comes.
    signals.worker_ready.connect(lambda **_: runner.report_copies(), weak=False)
