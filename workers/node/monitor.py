"""The node's background loop: heartbeats, VM state changes and metrics, through Redis.

Every ``heartbeat_interval`` it writes the heartbeat key (with a TTL, so a dead node's key vanishes
by itself) holding every VM's state and the ids of half-made copies without a definition, and reports
VMs whose state changed on their own (a QEMU that was killed, a guest that powered off). Every
``metrics_interval`` it pushes node and per-VM samples to a capped Redis list that the control worker
drains in bulk.
"""

import json
import logging
import threading
import time

import psutil
import redis

from workers import contract
from workers.qemu import QemuDriver, QemuError, VmState, VmStatus

from .config import NodeConfig
from .reports import Reporter, vm_entry

logger = logging.getLogger(__name__)


class Monitor(threading.Thread):
    def __init__(
        self, config: NodeConfig, driver: QemuDriver, reporter: Reporter, client: redis.Redis
    ) -> None:
        super().__init__(name=f"monitor-{config.name}", daemon=True)
        self.config = config
        self.driver = driver
        self.reporter = reporter
        self.redis = client
        self._stop_event = threading.Event()
        self._last_states: dict[str, VmState] = {}
        self._last_metrics = 0.0
        self._processes: dict[int, psutil.Process] = {}

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                self.beat()
            except (redis.RedisError, QemuError, OSError) as exc:
                logger.warning("node monitor: %s", exc)
            except Exception:
                logger.exception("node monitor failed; retrying")
            self._stop_event.wait(self.config.heartbeat_interval)

    def beat(self) -> None:
        statuses = self.driver.discover()
        self._report_changes(statuses)
        payload: contract.Heartbeat = {
            "ts": time.time(),
            "vms": [vm_entry(status) for status in statuses],
            "partial": self._partial_copies(statuses),
        }
        key = contract.HEARTBEAT_KEY.format(name=self.config.name)
        self.redis.set(key, json.dumps(payload), ex=self.config.heartbeat_ttl)
        now = time.monotonic()
        if now - self._last_metrics >= self.config.metrics_interval:
            self._last_metrics = now
            self._push_metrics(statuses)

    def _partial_copies(self, statuses: list[VmStatus]) -> list[str]:
        """VMs with a run directory but no definition, which ``discover`` skips: a create under way, or
        what a migration left half-made here (a cold migration's destination before its finish). The
        control side cleans the latter again when the abort that should have removed it was lost."""
        defined = {status.uuid for status in statuses}
        return [uuid for uuid in self.driver.layout.vm_uuids() if uuid not in defined]

    def _report_changes(self, statuses: list[VmStatus]) -> None:
        current = {status.uuid: status.state for status in statuses}
        # A VM seen for the first time counts as changed too: one created and killed between two beats
        # is first seen dead and must still be reported (the control side ignores what it knows).
        changed = [s for s in statuses if self._last_states.get(s.uuid) != s.state]
        self._last_states = current
        if changed:
            self.reporter.vm_states(changed, complete=False)

    def _push_metrics(self, statuses: list[VmStatus]) -> None:
        now = time.time()
        node = self.config.name
        disk = psutil.disk_usage(str(self.config.data_dir))
        memory = psutil.virtual_memory()
        samples: list[contract.MetricSample] = [
            {"ts": now, "node": node, "name": "node.cpu_percent", "value": psutil.cpu_percent(interval=None)},
            {
                "ts": now,
                "node": node,
                "name": "node.memory_used_bytes",
                "value": memory.total - memory.available,
            },
            {"ts": now, "node": node, "name": "node.memory_percent", "value": memory.percent},
            {"ts": now, "node": node, "name": "node.disk_used_bytes", "value": disk.used},
            {"ts": now, "node": node, "name": "node.disk_percent", "value": disk.percent},
        ]
        # Each migration here starts or ends a QEMU: only the running ones' processes are kept.
        running = {status.pid for status in statuses if status.pid is not None}
        self._processes = {pid: process for pid, process in self._processes.items() if pid in running}
        for status in statuses:
            if status.pid is None:
                continue
            process = self._process(status.pid)
            if process is None:
                continue
            try:
                with process.oneshot():
                    cpu = process.cpu_times()
                    rss = process.memory_info().rss
                    io = process.io_counters()
            except psutil.Error:
                continue
            for name, value in (
                ("vm.cpu_seconds", cpu.user + cpu.system),
                ("vm.rss_bytes", rss),
                ("vm.read_bytes", io.read_bytes),
                ("vm.write_bytes", io.write_bytes),
            ):
                samples.append(
                    {"ts": now, "node": node, "vm": status.uuid, "name": name, "value": float(value)}
                )
        pipe = self.redis.pipeline()
        pipe.rpush(contract.METRICS_LIST, *(json.dumps(sample) for sample in samples))
        pipe.ltrim(contract.METRICS_LIST, -contract.METRICS_LIST_MAX, -1)
        pipe.execute()

    def _process(self, pid: int) -> psutil.Process | None:
        process = self._processes.get(pid)
        if process is None or not process.is_running():
            try:
                process = psutil.Process(pid)
            except psutil.Error:
                self._processes.pop(pid, None)
                return None
            self._processes[pid] = process
        return process
