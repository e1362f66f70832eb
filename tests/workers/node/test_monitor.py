"""The node monitor's metrics: one sample set per running QEMU, and no memory of QEMUs that ended.

Real processes stand in for QEMU (a metric sample needs only a pid), the samples go to a private
``redis-server``; the VM list is what ``driver.discover`` would answer.
"""

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.faults.redis_server import PrivateRedis, private_redis  # noqa: F401 (fixture)
from tests.workers.node.conftest import node_config
from tests.workers.qemu.conftest import data_dir, driver  # noqa: F401 (fixtures)
from workers import contract
from workers.node.__main__ import make_app
from workers.node.monitor import Monitor
from workers.node.reports import Reporter
from workers.qemu import QemuDriver, VmState
from workers.qemu.status import VmStatus


@pytest.fixture
def monitor(
    driver: QemuDriver,  # noqa: F811
    data_dir: Path,  # noqa: F811
    private_redis: PrivateRedis,  # noqa: F811
) -> Iterator[Monitor]:
    config = node_config(data_dir, name="mon1", dwcp_port=18252, redis_url=private_redis.url)
    client = redis.Redis.from_url(private_redis.url)
    yield Monitor(config, driver, Reporter(make_app(config), config.name), client)
    client.close()


@pytest.fixture
def stand_ins() -> Iterator[list[subprocess.Popen[bytes]]]:
    processes = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(3)]
    yield processes
    for process in processes:
        process.kill()
        process.wait()


def _running(uuid: str, pid: int) -> VmStatus:
    return VmStatus(uuid, VmState.RUNNING, "running", pid=pid, qemu_status="running")


def _samples(client: redis.Redis) -> list[dict[str, object]]:
    raw = client.lrange(contract.METRICS_LIST, 0, -1)
    client.delete(contract.METRICS_LIST)
    return [json.loads(item) for item in raw]


def test_metrics_follow_the_running_qemus_and_forget_the_ended_ones(
    monitor: Monitor, stand_ins: list[subprocess.Popen[bytes]]
) -> None:
    first, second, third = stand_ins
    monitor._push_metrics([_running("vm-a", first.pid), _running("vm-b", second.pid)])
    rss = {s["vm"]: s["value"] for s in _samples(monitor.redis) if s["name"] == "vm.rss_bytes"}
    assert set(rss) == {"vm-a", "vm-b"} and all(isinstance(v, float) and v > 0 for v in rss.values())

    # vm-a migrated away (its QEMU ended) and came back under a new QEMU: 1000 such moves would
    # otherwise keep 1000 process handles.
    first.kill()
    first.wait()
    monitor._push_metrics([_running("vm-a", third.pid), _running("vm-b", second.pid)])
    samples = _samples(monitor.redis)
    assert {s["vm"] for s in samples if s["name"] == "vm.rss_bytes"} == {"vm-a", "vm-b"}
    assert set(monitor._processes) == {second.pid, third.pid}

    monitor._push_metrics([])
    assert monitor._processes == {}
    assert {s["name"] for s in _samples(monitor.redis)} == {
        "node.cpu_percent",
        "node.memory_used_bytes",
        "node.memory_percent",
        "node.disk_used_bytes",
        "node.disk_percent",
    }
