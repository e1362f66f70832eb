"""A node worker that starts again removes the destination copies of migrations that ended meanwhile.

The copies are made as a real prepare makes them (QEMU waiting with ``-incoming defer`` behind its NBD
export, under TCG). The runner lists them on the control queue of a private ``redis-server``, the
control side (real PostgreSQL) answers on the node's queue, and the runner acts on that answer: only
the waiting copy of an ended migration goes; an active migration's copy and a copy whose guest runs
stay.
"""

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from django.conf import settings

from apps.migrations import services, tasks
from apps.migrations.models import Migration
from apps.vms.models import VM
from novacron.celery import app as control_app
from tests.apps.migrations.test_migration_leftovers import (  # noqa: F401 (fixtures)
    DEST,
    SOURCE,
    _migrate,
    _sent,
    client,
    queued,
    running_vm,
)
from tests.conftest import vm_payload
from tests.faults.redis_server import PrivateRedis, private_redis  # noqa: F401 (fixture)
from tests.workers.node.conftest import Cluster, node_config, wait_for
from tests.workers.node.test_migration import _create_running
from tests.workers.qemu.conftest import data_dir, driver, testguest  # noqa: F401 (fixtures)
from workers import contract
from workers.node.__main__ import make_app
from workers.node.migration.markers import MARKER
from workers.node.migration.runner import MigrationRunner
from workers.qemu import KernelImage, QemuDriver, VmSpec, VmState

pytestmark = [pytest.mark.integration, pytest.mark.qemu, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def runner(
    driver: QemuDriver,  # noqa: F811
    data_dir: Path,  # noqa: F811
    private_redis: PrivateRedis,  # noqa: F811
) -> Iterator[MigrationRunner]:
    config = node_config(
        data_dir, name=DEST, dwcp_port=18250, redis_url=private_redis.url, dwcp_secret=settings.DWCP_SECRET,
        concurrency=2,
    )  # fmt: skip
    node_app = make_app(config)
    control_app.set_current()  # a new Celery app makes itself current: shared tasks would follow it
    node_redis = redis.Redis.from_url(private_redis.url)
    yield MigrationRunner(config, driver, node_app, node_redis)
    node_redis.close()


def _spec(vm: VM, image: KernelImage) -> VmSpec:
    return VmSpec(str(vm.pk), vm.name, 1, 128, 1, image)


def _reports(private_redis: PrivateRedis, event: str) -> dict[str, str]:  # noqa: F811
    """The runner's migration reports of ``event`` on the private control queue: migration id -> detail."""
    control = queued(redis.Redis.from_url(private_redis.url), contract.CONTROL_QUEUE)
    return {
        kwargs["migration_id"]: kwargs["detail"]
        for task, kwargs in control
        if task == contract.CONTROL_MIGRATION_REPORT and kwargs["event"] == event
    }


def test_a_starting_node_removes_only_the_waiting_copy_of_an_ended_migration(
    client: redis.Redis,  # noqa: F811
    api,
    running_vm: VM,  # noqa: F811
    user,
    runner: MigrationRunner,
    driver: QemuDriver,  # noqa: F811
    testguest: KernelImage,  # noqa: F811
    private_redis: PrivateRedis,  # noqa: F811
):
    vms = [running_vm]
    for name in ("web-2", "web-3"):
        vm_id = api.post("/api/v1/vms/", vm_payload(name=name, node=SOURCE), format="json").json()["id"]
        VM.objects.filter(pk=vm_id).update(state="running")
        vms.append(VM.objects.get(pk=vm_id))
    ended, ran_here = (_migrate(vm, user) for vm in (vms[0], vms[2]))
    for migration in (ended, ran_here):  # failed while this node was down: its abort never came
        services.migration_report(
            migration_id=str(migration.pk), node=SOURCE, role="source", event="failed", detail="link down"
        )
    active = _migrate(vms[1], user)
    client.delete(contract.node_queue(DEST))
    # The node's copies, as its prepares made them: two QEMUs waiting for their incoming migration; the
    # third copy's guest runs (a copy that switched and lost its report, say): it may be the only one.
    for vm, migration in ((vms[0], ended), (vms[1], active)):
        runner.prepare(
            migration_id=str(migration.pk), vm=_spec(vm, testguest).to_dict(), mode="live", source_node=SOURCE
        )
        assert driver.status(str(vm.pk)).qemu_status == "inmigrate"
    assert set(_reports(private_redis, "prepared")) == {str(ended.pk), str(active.pk)}
    ran_spec = _spec(vms[2], testguest)
    driver.create(ran_spec)
    driver.start(ran_spec.uuid)
    marker = {"migration_id": str(ran_here.pk), "role": "dest"}
    (driver.paths(ran_spec.uuid).run_dir / MARKER).write_text(json.dumps(marker))

    runner.report_copies()  # what the worker does once it is ready
    ((task, kwargs),) = [
        (task, kwargs)
        for task, kwargs in queued(redis.Redis.from_url(private_redis.url), contract.CONTROL_QUEUE)
        if task == contract.CONTROL_MIGRATION_COPIES
    ]
    assert kwargs["node"] == DEST
    assert {copy["migration_id"] for copy in kwargs["copies"]} == {
        str(m.pk) for m in (ended, active, ran_here)
    }
    tasks.migration_copies(**kwargs)  # the control worker's task, run here
    ((task, answer),) = _sent(client, DEST)
    assert task == contract.NODE_MIGRATION_LEFTOVERS
    assert {copy["migration_id"] for copy in answer["ended"]} == {str(ended.pk), str(ran_here.pk)}
    runner.remove_leftovers(**answer)

    assert not driver.paths(str(vms[0].pk)).run_dir.exists()
    assert not driver.paths(str(vms[0].pk)).disk.exists()
    assert driver.status(str(vms[1].pk)).qemu_status == "inmigrate"  # its migration still runs
    assert driver.status(ran_spec.uuid).state == VmState.RUNNING
    assert set(_reports(private_redis, "aborted")) == {str(ended.pk)}
    assert "its QEMU is running" in _reports(private_redis, "kept")[str(ran_here.pk)]
    assert Migration.objects.get(pk=active.pk).status == "transferring"
    # A second answer (a redelivered message) finds nothing more to remove.
    runner.remove_leftovers(
        ended=[*answer["ended"], {"migration_id": str(uuid.uuid4()), "vm_id": ran_spec.uuid, "role": "dest"}]
    )
    assert driver.status(ran_spec.uuid).state == VmState.RUNNING
    # The active migration's own abort still removes its copy (and ends its watcher).
    runner.abort(migration_id=str(active.pk), vm=_spec(vms[1], testguest).to_dict(), role="dest")
    assert not driver.paths(str(vms[1].pk)).run_dir.exists()


@pytest.fixture
def cluster_extra_env() -> dict[str, str]:
    return {"MIGRATION_STALL_TIMEOUT": str(STALL_TIMEOUT)}


STALL_TIMEOUT = 8  # seconds: the watchdog fails the migration the killed workers left behind


def test_a_restarted_node_worker_removes_the_waiting_copy_whose_abort_was_lost(cluster: Cluster, api):
    source, dest = list(cluster.nodes)
    vm_id = _create_running(api, "left-behind", source)
    cluster.nodes[source].kill()  # the send never runs: the destination waits
    migration_id = api.post(f"/api/v1/vms/{vm_id}/migrate/", {"dest_node": dest}, format="json").json()["id"]
    wait_for(
        lambda: Migration.objects.get(pk=migration_id).status == "transferring", 60, "the destination ready"
    )
    pidfile = cluster.data_dirs[dest] / "run" / vm_id / "qemu.pid"
    qemu_pid = int(pidfile.read_text())
    cluster.nodes[dest].kill()  # its QEMU lives on, waiting with -incoming defer
    wait_for(lambda: Migration.objects.get(pk=migration_id).status == "failed", 60, "the watchdog")
    # The abort goes out when the failure commits, a moment after the status shows: lose it once queued.
    broker = redis.Redis.from_url(settings.REDIS_URL)
    wait_for(
        lambda: any(
            name == contract.NODE_MIGRATION_ABORT and kwargs["migration_id"] == migration_id
            for name, kwargs in queued(broker, contract.node_queue(dest))
        ),
        10,
        "the abort in the destination's queue",
    )
    broker.delete(contract.node_queue(dest))  # its abort is lost
    assert Path(f"/proc/{qemu_pid}").exists()
    cluster.start_node(dest)
    wait_for(lambda: not (cluster.data_dirs[dest] / "run" / vm_id).exists(), 30, "the leftover to be removed")
    wait_for(lambda: not Path(f"/proc/{qemu_pid}").exists(), 10, "the waiting QEMU to end")

    def details() -> list[str]:
        return list(Migration.objects.get(pk=migration_id).events.values_list("detail", flat=True))

    wait_for(
        lambda: "dest aborted: leftover destination copy removed when the node worker started" in details(),
        30,
        "the node's report",
    )
    assert not any("sent again" in detail for detail in details())  # not the heartbeat reconciler's doing
    assert VM.objects.get(pk=vm_id).node.name == source
