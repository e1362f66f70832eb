"""A real cluster for integration tests: the control worker (with beat) and two node workers as processes.

The processes share the test database (committed data: tests use ``transaction=True``) and a Redis
database of their own; the VMs are the test guest under TCG.
"""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

from apps.vms.models import Image, Node
from workers.net.dataplane import DataPlane, NetSettings
from workers.net.names import node_tag
from workers.node.config import NodeConfig
from workers.qemu import AcceleratorSetting

ROOT = Path(__file__).resolve().parents[3]
GUEST_DIR = ROOT / "var" / "images" / "testguest"


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def node_config(
    data_dir: Path,
    *,
    name: str = "n1",
    address: str = "127.0.0.1",
    redis_url: str = "redis://127.0.0.1:1/0",  # never used unless a test says so
    dwcp_port: int = 18251,  # never listened on: no transfer reaches these nodes
    dwcp_secret: str = "s" * 32,
    concurrency: int = 1,
) -> NodeConfig:
    """A node worker's configuration for tests that run its parts in the test process (TCG)."""
    return NodeConfig(
        name=name,
        data_dir=data_dir,
        dwcp_host="127.0.0.1",
        dwcp_port=dwcp_port,
        address=address,
        redis_url=redis_url,
        dwcp_secret=dwcp_secret,
        accelerator=AcceleratorSetting.TCG,
        concurrency=concurrency,
        heartbeat_interval=1.0,
        metrics_interval=10.0,
        powerdown_timeout=1.0,
    )


def _database_url() -> str:
    db = settings.DATABASES["default"]
    credentials = db["USER"] + (f":{db['PASSWORD']}" if db.get("PASSWORD") else "")
    return f"postgres://{credentials}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


@dataclass
class Process:
    name: str
    command: list[str]
    env: dict[str, str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.popen = subprocess.Popen(
                self.command,
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.popen is not None and self.popen.poll() is None:
            os.killpg(self.popen.pid, sig)
            self.popen.wait(timeout=30)

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@dataclass(frozen=True)
class NodeHost:
    """Where a cluster's node worker runs when not beside the test: a network namespace with its own
    underlay ``address`` (DWCP listens there; other nodes and VXLAN reach it there)."""

    netns: str
    address: str
    extra_args: tuple[str, ...] = ()


@dataclass
class Cluster:
    workdir: Path
    short_dir: Path
    env: dict[str, str]
    control: Process
    nodes: dict[str, Process] = field(default_factory=dict)
    data_dirs: dict[str, Path] = field(default_factory=dict)
    beside: set[str] = field(default_factory=set)  # the nodes in the test's own network namespace

    def node_process(self, name: str, port: int, host: NodeHost | None = None) -> Process:
        data_dir = self.short_dir / name  # unix socket paths under it must fit in 107 bytes
        self.data_dirs[name] = data_dir
        if host is None:
            self.beside.add(name)
        listen = f"{host.address}:7400" if host else f"127.0.0.1:{port}"
        prefix = ["ip", "netns", "exec", host.netns] if host else []
        # Nodes beside the test share its namespace (and other sessions'): each its own VXLAN port.
        vxlan = () if host else ("--vxlan-port", str(_free_port(socket.SOCK_DGRAM)))
        command = [
            *prefix,
            sys.executable,
            "-m",
            "workers.node",
            "--name",
            name,
            "--data-dir",
            str(data_dir),
            "--dwcp-listen",
            listen,
            "--accelerator",
            "tcg",
            "--heartbeat-interval",
            "1",
            *vxlan,
            *(host.extra_args if host else ()),
        ]
        return Process(name, command, self.env, self.workdir / f"{name}.log")

    def start_node(self, name: str) -> None:
        self.nodes[name].start()

    def stop(self) -> None:
        for process in self.nodes.values():
            process.stop()
        self.control.stop()


def _unwire(name: str, data_dir: Path) -> None:
    """Remove what a stopped node worker beside the test wired for its VMs (a worker leaves it on
    purpose: its VMs keep their network across a restart), as the node would with no VM left."""
    net = NetSettings(
        tag=node_tag(name, data_dir), underlay_address="127.0.0.1", vxlan_port=0, state_dir=data_dir / "net"
    )
    DataPlane(net).reconcile({}, {})


def _free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def test_guest() -> Path:
    """The test guest's manifest; the builder rebuilds a guest built from other sources (an older
    init.sh, say) and only checks an up-to-date one."""
    subprocess.run(
        [sys.executable, "-m", "workers.guest.build", "--out", str(GUEST_DIR)],
        cwd=ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return GUEST_DIR / "manifest.json"


@pytest.fixture
def guest_image(test_guest: Path, transactional_db: None) -> Image:
    result = subprocess.run(
        [sys.executable, "manage.py", "bootstrap"],
        cwd=ROOT,
        env=os.environ
        | {
            "DJANGO_SETTINGS_MODULE": "novacron.settings.main",
            "DATABASE_URL": _database_url(),
            "SECRET_KEY": "integration",
            "NOVACRON_ADMIN_PASSWORD": "integration-admin",
        },
        check=False,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, f"manage.py bootstrap failed:\n{result.stdout}\n{result.stderr}"
    return Image.objects.get(name="testguest")


@pytest.fixture
def cluster_redis_url() -> str | None:
    """The Redis URL of the cluster's processes; ``None`` keeps the test settings' (override to isolate)."""
    return None


@pytest.fixture
def cluster_extra_env() -> dict[str, str]:
    """Extra environment for the cluster's processes (override in a test module)."""
    return {}


@pytest.fixture
def cluster_hosts() -> tuple[NodeHost | None, ...]:
    """Where the cluster's two node workers run: ``None`` beside the test (override in a test module)."""
    return (None, None)


@pytest.fixture
def cluster(
    tmp_path: Path,
    transactional_db: None,
    guest_image: Image,
    cluster_redis_url: str | None,
    cluster_extra_env: dict[str, str],
    cluster_hosts: tuple[NodeHost | None, ...],
) -> Iterator[Cluster]:
    suffix = f"{int(time.time() * 1000) % 1000000}"
    env = os.environ | {
        "DJANGO_SETTINGS_MODULE": "novacron.settings.main",
        "DATABASE_URL": _database_url(),
        "REDIS_URL": cluster_redis_url or settings.REDIS_URL,
        "SECRET_KEY": "integration",
        "DWCP_SECRET": settings.DWCP_SECRET,
        "NODE_POWERDOWN_TIMEOUT": "1",
        "NODE_HEARTBEAT_TIMEOUT": "6",
        "CPU_ALLOCATION_RATIO": "16",
        "LOG_LEVEL": "INFO",
    }
    if cluster_redis_url:
        env["CELERY_BROKER_URL"] = cluster_redis_url
    env |= cluster_extra_env
    control = Process(
        "control",
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "novacron",
            "worker",
            "-B",
            "-Q",
            "control",
            "-n",
            f"control{suffix}@%h",
            "--pool",
            "threads",
            "--concurrency",
            "4",
            "--without-gossip",
            "--without-mingle",
            "--loglevel",
            "INFO",
            "--schedule",
            str(tmp_path / "beat-schedule"),
        ],
        env,
        tmp_path / "control.log",
    )
    short_dir = Path(tempfile.mkdtemp(prefix="nc-"))
    cluster = Cluster(tmp_path, short_dir, env, control)
    for index, host in enumerate(cluster_hosts, 1):
        name = f"n{index}-{suffix}"
        cluster.nodes[name] = cluster.node_process(name, _free_port(), host)
    control.start()
    for process in cluster.nodes.values():
        process.start()
    try:
        wait_for(
            lambda: Node.objects.filter(name__in=list(cluster.nodes)).count() == len(cluster.nodes),
            60,
            "the nodes to register",
        )
        yield cluster
    except BaseException:
        for process in [control, *cluster.nodes.values()]:
            print(f"--- {process.name} ---\n{process.output()}")
        raise
    finally:
        cluster.stop()
        for name, data_dir in cluster.data_dirs.items():
            for pidfile in data_dir.glob("run/*/qemu.pid"):
                with contextlib.suppress(ValueError, ProcessLookupError):
                    os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)
            if name in cluster.beside:  # its bridges, VXLAN devices, rules and dnsmasq are in this namespace
                _unwire(name, data_dir)
        shutil.rmtree(short_dir, ignore_errors=True)
