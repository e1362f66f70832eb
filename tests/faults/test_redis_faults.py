"""Redis restarted during a live migration, on a private ``redis-server`` (the machine's shared one
on 6379 is never touched): broker, progress, control knobs and heartbeats all go away for a moment.

The cluster's processes and this test's own task producer point at the private server; it keeps an
append-only file, as a production Redis would, so a restart loses no queued message.
"""

import threading
import time

import pytest

from apps.migrations.models import Migration
from apps.migrations.services import MIGRATION_LEFTOVER_GRACE_SECONDS
from apps.vms.models import VM, Image
from tests.faults.conftest import FaultRecord
from tests.faults.invariants import assert_invariant, create_running, run_dir, wait_terminal
from tests.faults.redis_server import PrivateRedis
from tests.workers.node import test_migration
from tests.workers.node.conftest import Cluster, wait_for

pytestmark = [
    pytest.mark.faults,
    pytest.mark.integration,
    pytest.mark.qemu,
    pytest.mark.django_db(transaction=True),
]


class Supervisor(threading.Thread):
    """Restarts a node or control worker that exited, as the deployment's supervisor does (compose:
    restart). Both exit on kombu's failure to restore a running task's message on the dead
    connection ("Unrecoverable error: AttributeError ... hostname"): the node worker on purpose (see
    ``workers.node.__main__``), Celery's control worker by itself (seen in CI with a report in hand)."""

    def __init__(self, cluster: Cluster) -> None:
        super().__init__(daemon=True)
        self.cluster = cluster
        self.restarts: list[str] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(0.5):
            workers = {f"node worker {name}": process for name, process in self.cluster.nodes.items()}
            for name, process in {**workers, "control worker": self.cluster.control}.items():
                if process.popen is not None and process.popen.poll() is not None:
                    code = process.popen.returncode
                    self.restarts.append(f"{name} exited ({code}) on the broker loss; restarted")
                    process.start()


@pytest.fixture
def dirty_image(guest_image: Image) -> Image:
    return test_migration.dirty_image.__wrapped__(guest_image)  # type: ignore[attr-defined]


def test_redis_restarted_during_live_migration(
    cluster: Cluster, api, dirty_image: Image, private_redis: PrivateRedis, fault: FaultRecord
):
    fault.describe(
        scenario="Redis restarted during a live migration",
        action="live-migrate a memory-dirtying guest at 8 Mbit/s on a private redis-server (AOF on); "
        "stop it while transferring, start it again 2 s later, then lift the bandwidth limit",
        invariant="the migration ends (completed, or failed with an error); the VM runs on exactly one "
        "node with its disk marker intact; capacity; the cluster keeps working (a VM stop goes through)",
    )
    from workers.guest.boot import GuestChannel

    source, dest = list(cluster.nodes)
    vm_id = create_running(api, "redis-r", source, dirty_image.name)
    channel = GuestChannel.connect(run_dir(cluster, source, vm_id) / "guest.sock", timeout=30)
    try:
        channel.wait_for(r"dirty ready", 120)
        channel.request("disk-write", "through-redis-restart", timeout=60)
    finally:
        channel.close()
    response = api.post(
        f"/api/v1/vms/{vm_id}/migrate/",
        {"dest_node": dest, "mode": "live", "bandwidth_limit_mbps": 8},
        format="json",
    )
    assert response.status_code == 202, response.json()
    migration_id = response.json()["id"]
    wait_for(lambda: Migration.objects.get(pk=migration_id).status == "transferring", 60, "transferring")
    time.sleep(1)
    # The supervisor runs to the end, as a deployment's does: a worker can exit on the broker loss just
    # as the migration ends (seen: the source's, a moment after its send task finished), and one left
    # down consumes neither its cleanup nor anything else.
    supervisor = Supervisor(cluster)
    supervisor.start()
    try:
        private_redis.stop()
        fault.injected()
        time.sleep(2)
        private_redis.start()
        # 8 Mbit/s cannot keep up with the guest's dirtying: lift the limit, through the control knobs
        # in the restarted Redis, so the migration can converge.
        response = api.patch(
            f"/api/v1/migrations/{migration_id}/", {"bandwidth_limit_mbps": None}, format="json"
        )
        assert response.status_code == 200, response.json()
        migration = wait_terminal(migration_id, 120)
        fault.note(f"migration ended {migration.status}: {migration.error or 'no error'}")
        # A cleanup lost with Redis is sent again from the heartbeats once the grace period has passed.
        assert_invariant(cluster, timeout=MIGRATION_LEFTOVER_GRACE_SECONDS + 45)
        for restarted in supervisor.restarts:
            fault.note(restarted)
        fault.recovered()
        if migration.status == "failed":
            assert migration.error
        vm = VM.objects.select_related("node").get(pk=vm_id)
        assert vm.state == "running"
        channel = GuestChannel.connect(run_dir(cluster, vm.node.name, vm_id) / "guest.sock", timeout=30)
        try:
            assert channel.request("disk-read", timeout=60) == ["through-redis-restart"]
        finally:
            channel.close()
        # The workers reconnected: an ordinary operation still goes through end to end.
        assert api.post(f"/api/v1/vms/{vm_id}/stop/").status_code == 202
        wait_for(lambda: VM.objects.get(pk=vm_id).state == "stopped", 60, "the VM to stop after the restart")
        assert_invariant(cluster)
    finally:
        supervisor.stop_event.set()
        supervisor.join(timeout=5)
