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
    ) -> None:
        node = NodeMigrations(config, driver, app, client, network)
        self.source = Source(node)
        self.destination = Destination(node)
        self.leftovers = Leftovers(node)

    def prepare(self, **request: Unpack[contract.MigrationPrepare]) -> None:
        self.destination.prepare(request)

    def send(self, **request: Unpack[contract.MigrationSend]) -> None:
        self.source.send(request)

    def finish(self, **request: Unpack[contract.MigrationFinish]) -> None:
        self.destination.finish(request)

    def abort(self, **request: Unpack[contract.MigrationAbort]) -> None:
        if request["role"] == "source":
            self.source.abort(request)
        else:
            self.destination.abort(request)

    def cleanup(self, **request: Unpack[contract.MigrationCleanup]) -> None:
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
