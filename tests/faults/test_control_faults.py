"""Control-side faults: the control worker killed while a batch runs.

The control worker records every node report; killed with SIGKILL it cannot acknowledge or give back
the messages it held, so they come back only through the broker's redelivery (visibility timeout).
"""

import time

import pytest

from apps.vms.models import VM
from tests.faults.conftest import FaultRecord
from tests.faults.invariants import FAULT_STALL_TIMEOUT, assert_invariant
from tests.workers.node.conftest import Cluster, wait_for

pytestmark = [
    pytest.mark.faults,
    pytest.mark.integration,
    pytest.mark.qemu,
    pytest.mark.django_db(transaction=True),
]

CONTROL_VISIBILITY = 10


@pytest.fixture
def cluster_extra_env() -> dict[str, str]:
    return {
        "MIGRATION_STALL_TIMEOUT": str(FAULT_STALL_TIMEOUT),
        # Production: 300 s. Short here so the redelivery of what the killed worker held is seen.
        "CELERY_CONTROL_VISIBILITY_TIMEOUT": str(CONTROL_VISIBILITY),
    }


def test_control_worker_killed_while_a_batch_runs(cluster: Cluster, api, fault: FaultRecord):
    fault.describe(
        scenario="kill -9 of the control worker while a batch runs",
        action="POST a batch of 6 VMs; SIGKILL the control worker (with beat) as soon as the first "
        "item succeeded; restart it 2 s later",
        invariant="the batch completes with every item succeeded; every VM running on exactly one node; "
        "capacity equals the VMs' demand",
    )
    items = [
        {"name": f"cb{i}", "image": "testguest", "vcpus": 1, "memory_mb": 96, "disk_gb": 1} for i in range(6)
    ]
    response = api.post("/api/v1/vms/batch/", {"vms": items}, format="json")
    assert response.status_code == 202, response.json()
    batch_id = response.json()["batch"]["id"]
    wait_for(
        lambda: api.get(f"/api/v1/batches/{batch_id}/").json()["counts"]["succeeded"] >= 1,
        120,
        "the first item",
        interval=0.1,
    )
    cluster.control.kill()
    fault.injected()
    counts = api.get(f"/api/v1/batches/{batch_id}/").json()["counts"]
    fault.note(f"killed with counts {counts}")
    time.sleep(2)
    cluster.control.start()

    def done() -> bool:
        return api.get(f"/api/v1/batches/{batch_id}/").json()["status"] != "running"

    wait_for(done, 120, "the batch to finish", interval=0.5)
    assert_invariant(cluster)
    fault.recovered()
    detail = api.get(f"/api/v1/batches/{batch_id}/").json()
    assert detail["status"] == "completed", detail["counts"]
    assert VM.objects.filter(state="running").count() == 6
