"""``python -m workers.node --name NAME --data-dir DIR --dwcp-listen HOST:PORT``: run a node worker."""

import logging
import os
import sys
from typing import Any

import redis
from celery import Celery, signals
from kombu import Queue

from workers import contract
from workers.dwcp import DWCPError, DWCPServer
from workers.net import names
from workers.net.model import NetworkError
from workers.qemu import DataDirError, DriverSettings, QemuDriver, QemuNotInstalled
from workers.qemu.layout import NodeLayout

from .allocator import cap_malloc_arenas
from .config import ConfigError, NodeConfig, from_args
from .console import ConsoleManager
from .image_fetch import ImageTasks, register_image_tasks
from .images import ImageCache
from .migration.runner import MigrationRunner, register_migration_tasks
from .monitor import Monitor
from .network import NodeNetwork
from .reports import Reporter
from .tasks import register_tasks

logger = logging.getLogger("workers.node")


def make_app(config: NodeConfig) -> Celery:
    """A Celery app without Django: JSON only, at-least-once, consuming ``node.<name>`` alone."""
    app = Celery(f"novacron-node-{config.name}", broker=config.redis_url)
    queue = contract.node_queue(config.name)
    app.conf.update(
        accept_content=["json"],
        task_serializer="json",
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_queues=[Queue(queue, routing_key=queue)],
        task_default_queue=queue,
        worker_hijack_root_logger=False,
        worker_send_task_events=True,
        task_send_sent_event=False,  # as the control plane (novacron/settings/celery.py)
        broker_connection_retry_on_startup=True,
        # Matches the control plane: no redelivery while a long task (a disk transfer) still runs.
        broker_transport_options={
            "visibility_timeout": int(os.environ.get("CELERY_VISIBILITY_TIMEOUT", "21600"))
        },
    )
    return app


def main(argv: list[str] | None = None) -> int:
    cap_malloc_arenas()  # before any thread: see workers.node.allocator
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    try:
        config = from_args(argv)
        driver = QemuDriver(
            DriverSettings(
                data_dir=config.data_dir,
                accelerator=config.accelerator,
                powerdown_timeout=config.powerdown_timeout,
            ),
            device_tag=names.node_tag(config.name, config.data_dir),  # the taps' names, as the data plane's
        )
        facts = driver.node_facts()
    except (ConfigError, QemuNotInstalled, DataDirError) as exc:
        print(f"novacron node: {exc}", file=sys.stderr)
        return 2
    app = make_app(config)
    reporter = Reporter(app, config.name)
    network = NodeNetwork(config)
    try:
        # Before any task: the taps of the VMs still running here, with the peers last heard.
        network.reconcile(driver)
    except NetworkError as exc:
        logger.error("node %s: the network data plane could not be rebuilt: %s", config.name, exc)
    images = ImageCache(config.data_dir, int(config.image_cache_gb * 2**30))
    register_tasks(app, driver, reporter, network, images)
    image_tasks = ImageTasks(config, images, reporter)
    register_image_tasks(app, image_tasks)
    client = redis.Redis.from_url(config.redis_url)
    monitor = Monitor(config, driver, reporter, client)
    register_migration_tasks(app, MigrationRunner(config, driver, app, client, network, images=images))
    consoles = ConsoleManager(NodeLayout(config.data_dir))
    try:
        dwcp = DWCPServer(
            listen=config.dwcp_address,
            root=config.data_dir,
            node_name=config.name,
            secret=config.dwcp_secret,
            tunnel_root=config.data_dir / "run",
            consoles=consoles,  # the VMs' serial consoles, for the control plane's console tickets
            link_outage_seconds=config.link_outage_seconds,
        ).start()
    except (DWCPError, OSError) as exc:
        print(f"novacron node: cannot serve DWCP on {config.dwcp_address}: {exc}", file=sys.stderr)
        return 2

    @signals.worker_ready.connect(weak=False)
    def announce(**_: Any) -> None:
        # Register first, then hand over every VM this node holds so the control side reconciles.
        reporter.register(
            address=config.address,
            dwcp_address=config.dwcp_address,
            facts=facts,
            vxlan_port=config.vxlan_port,
            networking=network.problem,
        )
        reporter.vm_states(driver.discover(), complete=True)
        image_tasks.report_listing(evict=True)  # the control plane's rows follow what the cache holds
        monitor.start()
        logger.info(
            "node %s ready: queue %s, accelerator %s",
            config.name,
            contract.node_queue(config.name),
            facts["accelerator"],
        )

    @signals.worker_shutdown.connect(weak=False)
    def shut_down(**_: Any) -> None:
        monitor.stop()
        dwcp.stop()
        consoles.stop()
        driver.close()

    exit_code = 1
    try:
        app.worker_main(
            [
                "worker",
                "--hostname",
                f"{config.name}@%h",
                "--pool",
                "threads",
                "--concurrency",
                str(config.concurrency),
                "--without-gossip",
                "--without-mingle",
                "--loglevel",
                os.environ.get("LOG_LEVEL", "INFO"),
            ]
        )
        exit_code = 0
    except SystemExit as exc:
        exit_code = exc.code if isinstance(exc.code, int) else 1
    finally:
        # Celery can give up on its broker connection and stop (found by the fault test 'Redis restarted
        # during a live migration': kombu fails restoring the running task's message on the dead
        # connection, "Unrecoverable error: AttributeError ... hostname") while the threads this worker
        # started (monitor, DWCP server, QMP loop) keep the process alive, heartbeating but consuming
        # nothing. Stop them and leave at once, so the supervisor starts a working worker; the VMs'
        # QEMUs are daemonized and unaffected.
        for stop in (monitor.stop, dwcp.stop, consoles.stop, driver.close):
            try:
                stop()
            except Exception:
                logger.exception("node %s: error while stopping", config.name)
        logger.info("node %s: worker stopped (exit code %s)", config.name, exit_code)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)


if __name__ == "__main__":
    sys.exit(main())
