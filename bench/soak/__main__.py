"""``make soak`` / ``python -m bench.soak``: ten minutes of mixed API load and continuous live migrations.

Starts everything itself, isolated from anything else on the machine: a private ``redis-server`` on a
free port, the database ``novacron_soak`` (created and migrated), granian serving the API, the control
worker with beat, and two node workers with the test guest under TCG, each in its own network
namespace (``bench.migration.netns``: two hosts joined by a veth link; their VMs' networks need a
namespace each, as on real hosts). Needs root. Two VMs migrate back and forth
between the nodes the whole time while client threads list, read and rename VMs and read migrations.
Every ``--interval`` seconds it prints requests, errors and p95 latency of that interval; at the end the
migrations completed and failed, and each process's RSS before the traffic ("cold"), after a warm-up of
``--warmup`` seconds of traffic and at the end (each the median of the first and the last three
samples: a node worker's reading holds its migration in flight); growth from the warm-up to the end must stay within
``--growth-limit`` (5 %; the first minutes load modules, fill pools and start threads once; the cold
column shows how much), with no 5xx and no failed migration.

``--link-cuts``: every ``--cut-every`` seconds the link between the nodes goes silent for
``--cut-seconds`` (every packet dropped, both ways) while migrations run over it: they must ride it
out. The report and a JSON file under ``bench/results/`` give every figure. Not part of CI.
"""

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from bench.migration.netns import Topology, cut, mend, two_hosts
from bench.migration.table import git_commit

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
DB_NAME = "novacron_soak"
TOPOLOGY = Topology.of("ncsk", 232)  # the nodes' namespaces (bench-migration's are its own)
DWCP_PORT = 7400


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except Exception:  # noqa: S110 - the thing waited for is not up yet
            pass
        time.sleep(0.5)
    raise SystemExit(f"soak: timed out waiting for {what}")


class Soak:
    def __init__(self, args: argparse.Namespace, topology: Topology) -> None:
        self.args = args
        self.topology = topology
        self.workdir = Path(tempfile.mkdtemp(prefix="nc-soak-"))
        self.redis_port = _free_port()
        self.web_port = _free_port()
        base = args.database_url.rsplit("/", 1)[0]
        self.database_url = f"{base}/{DB_NAME}"
        self.env = os.environ | {
            "DJANGO_SETTINGS_MODULE": "novacron.settings.main",
            "DATABASE_URL": self.database_url,
            "REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "SECRET_KEY": "soak-secret-key",
            "DWCP_SECRET": "soak-dwcp-secret",
            "NOVACRON_ADMIN_PASSWORD": "soak-admin",
            "THROTTLE_USER": "1000000/min",
            "CPU_ALLOCATION_RATIO": "16",
            "NODE_POWERDOWN_TIMEOUT": "1",
            "LOG_LEVEL": "INFO",
        }
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.requests = 0
        self.errors = 0
        self.statuses: dict[int, int] = {}
        self.stop = threading.Event()
        self.migrations = {"completed": 0, "failed": 0, "cancelled": 0}
        self.failures: list[str] = []  # the errors of failed migrations
        self.cuts: list[dict[str, float]] = []  # each link cut: start and length (s since the traffic began)
        self.began = 0.0
        self.token = ""

    # -- processes ------------------------------------------------------------------------------

    def spawn(self, name: str, command: list[str], env: dict[str, str] | None = None) -> None:
        log = (self.workdir / f"{name}.log").open("ab")
        self.processes[name] = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env or self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def start(self) -> None:
        # The nodes reach Redis over their own links to the host.
        binds = ["127.0.0.1", self.topology.host_a, self.topology.host_b]
        self.spawn(
            "redis",
            [
                "redis-server",
                "--port",
                str(self.redis_port),
                "--bind",
                *binds,
                "--save",
                "",
                "--protected-mode",
                "no",
            ],
        )
        import psycopg

        admin_url = self.database_url.rsplit("/", 1)[0] + "/postgres"
        with psycopg.connect(admin_url.replace("postgres://", "postgresql://"), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)")
            conn.execute(f"CREATE DATABASE {DB_NAME}")
        for command in (["migrate", "--noinput"], ["bootstrap"]):
            subprocess.run(
                [PY, "manage.py", *command], cwd=ROOT, env=self.env, check=True, capture_output=True
            )
        if not (ROOT / "var" / "images" / "testguest" / "manifest.json").exists():
            subprocess.run(
                [PY, "-m", "workers.guest.build", "--out", "var/images/testguest"], cwd=ROOT, check=True
            )
        granian = str(Path(PY).parent / "granian")
        self.spawn(
            "web",
            [
                granian,
                "--interface",
                "wsgi",
                "novacron.wsgi:application",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.web_port),
                "--workers",
                "1",
                "--blocking-threads",
                "4",
                "--no-ws",
            ],
            self.env | {"MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "2")},  # as the Procfile's
        )
        self.spawn(
            "control",
            [
                PY,
                "-m",
                "celery",
                "-A",
                "novacron",
                "worker",
                "-B",
                "-Q",
                "control",
                "-n",
                "control-soak@%h",
                "--pool",
                "threads",
                "--concurrency",
                "4",
                "--without-gossip",
                "--without-mingle",
                "--loglevel",
                "INFO",
                "--schedule",
                str(self.workdir / "beat-schedule"),
            ],
        )
        for name in ("soak1", "soak2"):
            self.start_node(name)
        sys.path.insert(0, str(ROOT))
        os.environ.update(self.env)
        import django

        django.setup()
        from django.contrib.auth import get_user_model

        from apps.accounts.services import token_create
        from apps.vms.models import Node

        _wait(lambda: Node.objects.filter(name__in=["soak1", "soak2"], status="up").count() == 2, 90, "nodes")
        user = get_user_model().objects.create_user(username="soaker", password="soak-pw-1234")  # noqa: S106 - a throwaway database
        self.token = token_create(user=user, name="soak").secret
        _wait(lambda: self.call("GET", "/healthz")[0] == 200, 30, "the web server")

    def start_node(self, name: str) -> None:
        """A node worker in its namespace, its DWCP server on the nodes' link."""
        command = [PY, "-m", "workers.node", "--name", name, "--data-dir", str(self.workdir / name)]
        command += ["--accelerator", "tcg", "--heartbeat-interval", "2"]
        topology = self.topology
        ns, redis_host, link = (
            (topology.ns_a, topology.host_a, topology.a_link)
            if name == "soak1"
            else (topology.ns_b, topology.host_b, topology.b_link)
        )
        env = self.env | {"REDIS_URL": f"redis://{redis_host}:{self.redis_port}/0"}
        self.spawn(name, ["ip", "netns", "exec", ns, *command, "--dwcp-listen", f"{link}:{DWCP_PORT}"], env)

    def cutter(self) -> None:
        """Every ``--cut-every`` seconds, the nodes' link silent for ``--cut-seconds``."""
        while not self.stop.wait(self.args.cut_every):
            started = time.monotonic()
            cut(self.topology)
            try:
                self.stop.wait(self.args.cut_seconds)
            finally:
                mend(self.topology)
            with self.lock:
                self.cuts.append(
                    {"at_s": round(started - self.began, 1), "seconds": round(time.monotonic() - started, 1)}
                )

    def shutdown(self) -> None:
        for process in reversed(list(self.processes.values())):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        for pidfile in self.workdir.glob("soak*/run/*/qemu.pid"):
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)
        logs = ROOT / "artifacts" / "soak"
        shutil.rmtree(logs, ignore_errors=True)
        logs.mkdir(parents=True)
        for log in self.workdir.glob("*.log"):
            shutil.copy(log, logs / log.name)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def rss(self) -> dict[str, int]:
        """Resident memory of each process tree (granian and Celery fork/threads included)."""
        sizes = {}
        for name, process in self.processes.items():
            try:
                parent = psutil.Process(process.pid)
                tree = [parent, *parent.children(recursive=True)]
                sizes[name] = sum(p.memory_info().rss for p in tree if p.is_running())
            except psutil.Error:
                sizes[name] = 0
        return sizes

    # -- traffic --------------------------------------------------------------------------------

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.web_port}{path}",
            data=json.dumps(body).encode() if body is not None else None,
            method=method,
            headers={"Authorization": f"Token {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - http to 127.0.0.1
                raw = response.read()
                status = response.status
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            status = exc.code
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, None

    def timed(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        started = time.monotonic()
        try:
            status, payload = self.call(method, path, body)
        except OSError:
            status, payload = 599, None
        elapsed = time.monotonic() - started
        with self.lock:
            self.requests += 1
            self.latencies.append(elapsed)
            self.statuses[status] = self.statuses.get(status, 0) + 1
            if status >= 500:
                self.errors += 1
        return status, payload

    def client(self, index: int, vm_ids: list[str]) -> None:
        step = 0
        while not self.stop.is_set():
            step += 1
            vm_id = vm_ids[step % len(vm_ids)]
            self.timed("GET", "/api/v1/vms/")
            self.timed("GET", f"/api/v1/vms/{vm_id}/")
            self.timed("GET", "/api/v1/users/me/")
            self.timed("GET", "/api/v1/migrations/")
            self.timed("GET", "/api/v1/nodes/")
            if step % 5 == 0:
                self.timed("PATCH", f"/api/v1/vms/{vm_id}/", {"name": f"soak-{index}-{step}"})
            time.sleep(self.args.think)

    def mover(self, vm_id: str) -> None:
        """Live-migrate one VM to the other node, again and again."""
        try:
            self._move(vm_id)
        except OSError:
            if not self.stop.is_set():  # the web server went away at shutdown: not an error then
                raise

    def _move(self, vm_id: str) -> None:
        while not self.stop.is_set():
            status, body = self.call("POST", f"/api/v1/vms/{vm_id}/migrate/", {"mode": "live"})
            if status != 202:
                time.sleep(2)
                continue
            migration_id = body["id"]
            while True:
                _, detail = self.call("GET", f"/api/v1/migrations/{migration_id}/")
                if detail and detail.get("status") in self.migrations:
                    with self.lock:
                        self.migrations[detail["status"]] += 1
                        if detail["status"] == "failed":
                            self.failures.append(str(detail.get("error", "")))
                    break
                time.sleep(1)
            _wait(lambda: self.call("GET", f"/api/v1/vms/{vm_id}/")[1]["state"] == "running", 60, "the VM")

    def run(self) -> int:
        self.start()
        vm_ids = []
        for index, node in enumerate(("soak1", "soak2")):
            status, body = self.call(
                "POST",
                "/api/v1/vms/",
                {
                    "name": f"mover{index}",
                    "image": "testguest",
                    "vcpus": 1,
                    "memory_mb": 128,
                    "disk_gb": 1,
                    "node": node,
                },
            )
            assert status == 202, body
            vm_ids.append(body["id"])
        for vm_id in vm_ids:
            _wait(
                lambda vm_id=vm_id: self.call("GET", f"/api/v1/vms/{vm_id}/")[1]["state"] == "running",
                120,
                "VMs",
            )
        threads = [
            threading.Thread(target=self.client, args=(i, vm_ids), daemon=True)
            for i in range(self.args.clients)
        ]
        threads += [threading.Thread(target=self.mover, args=(vm_id,), daemon=True) for vm_id in vm_ids]
        if self.args.link_cuts:
            threads.append(threading.Thread(target=self.cutter, daemon=True))
        time.sleep(5)
        rss_start = self.rss()
        began = self.began = time.monotonic()
        for thread in threads:
            thread.start()
        cuts = (
            f", the link cut for {self.args.cut_seconds} s every {self.args.cut_every} s"
            if self.args.link_cuts
            else ""
        )
        print(
            f"soak: {self.args.seconds} s, {self.args.clients} API clients, 2 VMs migrating between 2 nodes{cuts}"
        )
        print(
            f"{'t (s)':>6} {'requests':>9} {'5xx':>5} {'p50 ms':>7} {'p95 ms':>7} {'migr ok':>8} {'migr failed':>11}"
            f" {'RSS MiB (all)':>14} {'cuts':>5}"
        )
        intervals: list[dict[str, Any]] = []
        total_requests = 0
        warm_samples: list[dict[str, int]] = []  # every sample from the end of the warm-up on
        try:
            while time.monotonic() - began < self.args.seconds:
                time.sleep(self.args.interval)
                rss_now = self.rss()
                if time.monotonic() - began >= self.args.warmup:
                    warm_samples.append(rss_now)
                with self.lock:
                    window, self.latencies = self.latencies, []
                    requests, errors = self.requests, self.errors
                    migrations = dict(self.migrations)
                    cut_count = len(self.cuts)
                total_requests = requests
                p50 = statistics.median(window) * 1000 if window else 0.0
                p95 = statistics.quantiles(window, n=20)[18] * 1000 if len(window) >= 20 else 0.0
                elapsed = time.monotonic() - began
                print(
                    f"{elapsed:6.0f} {requests:9d} {errors:5d} {p50:7.1f} {p95:7.1f} "
                    f"{migrations['completed']:8d} {migrations['failed']:11d} {sum(rss_now.values()) / 2**20:14.1f}"
                    f" {cut_count:5d}",
                    flush=True,
                )
                intervals.append(
                    {
                        "t_s": round(elapsed),
                        "requests": requests,
                        "errors_5xx": errors,
                        "p50_ms": round(p50, 1),
                        "p95_ms": round(p95, 1),
                        "migrations": migrations,
                        "rss_mib": {name: round(size / 2**20, 1) for name, size in rss_now.items()},
                    }
                )
        finally:
            self.stop.set()
        time.sleep(3)
        rss_end = self.rss()
        print(
            f"\nrequests {total_requests}, 5xx {self.errors}, statuses {dict(sorted(self.statuses.items()))}"
        )
        print(f"migrations completed {self.migrations['completed']}, failed {self.migrations['failed']}")
        for error in self.failures:
            print(f"  failed: {error}")
        if self.args.link_cuts:
            lengths = ", ".join(f"{entry['seconds']:.0f} s at {entry['at_s']:.0f} s" for entry in self.cuts)
            print(f"link cuts {len(self.cuts)}: {lengths}")
        # Growth is judged from the end of the warm-up: the first minutes of traffic load modules,
        # fill connection pools and start threads once (the cold figure shows how much). Each end is
        # the median of RSS_SAMPLES samples: a node worker's reading holds the buffers of the
        # migration in flight at that moment (3-45 MiB), which one sample would take for growth.
        warm = _median_rss(warm_samples[:RSS_SAMPLES] or [rss_start])
        rss_end = _median_rss(warm_samples[-RSS_SAMPLES:] or [rss_end])
        print(
            f"\n{'process':<10} {'RSS cold MiB':>13} {'after warm-up':>14} {'RSS end MiB':>12} {'growth':>8}"
            f" {'(from cold)':>12}"
        )
        worst = 0.0
        growths: dict[str, float] = {}
        for name in rss_start:
            cold, start, end = (
                rss_start[name] / 2**20,
                warm.get(name, 0) / 2**20,
                rss_end.get(name, 0) / 2**20,
            )
            growth = (end - start) / start * 100 if start else 0.0
            from_cold = (end - cold) / cold * 100 if cold else 0.0
            worst = max(worst, growth)
            growths[name] = round(growth, 1)
            print(f"{name:<10} {cold:13.1f} {start:14.1f} {end:12.1f} {growth:7.1f}% {from_cold:11.1f}%")
        limit = self.args.growth_limit
        verdict = worst <= limit and self.errors == 0 and self.migrations["failed"] == 0
        print(
            f"\n{'PASS' if verdict else 'FAIL'}: worst RSS growth after the {self.args.warmup} s warm-up "
            f"{worst:.1f}% (limit {limit:g}%), {self.errors} 5xx, {self.migrations['failed']} failed migrations"
        )
        self.write_result(
            {
                "passed": verdict,
                "requests": total_requests,
                "errors_5xx": self.errors,
                "statuses": {str(code): count for code, count in sorted(self.statuses.items())},
                "migrations": self.migrations,
                "migration_failures": self.failures,
                "cuts": self.cuts,
                "rss_mib": {
                    name: {
                        "cold": round(rss_start[name] / 2**20, 1),
                        "after_warmup": round(warm.get(name, 0) / 2**20, 1),
                        "end": round(rss_end.get(name, 0) / 2**20, 1),
                    }
                    for name in rss_start
                },
                "rss_growth_percent": growths,
                "intervals": intervals,
            }
        )
        return 0 if verdict else 1

    def write_result(self, result: dict[str, Any]) -> None:
        commit = git_commit()
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        path = ROOT / "bench" / "results" / f"soak-{stamp}-{commit}.json"
        path.write_text(json.dumps({"commit": commit, "args": vars(self.args), **result}, indent=1) + "\n")
        print(f"result: {path.relative_to(ROOT)}")


RSS_SAMPLES = 3  # samples whose median is each end of the growth check


def _median_rss(samples: list[dict[str, int]]) -> dict[str, int]:
    """Each process's median RSS over ``samples``."""
    return {name: int(statistics.median(sample.get(name, 0) for sample in samples)) for name in samples[0]}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=600)
    parser.add_argument("--interval", type=int, default=30, help="seconds between report lines")
    parser.add_argument(
        "--warmup",
        type=int,
        default=60,
        help="seconds of traffic before the RSS baseline of the growth check",
    )
    parser.add_argument("--clients", type=int, default=4, help="API client threads")
    parser.add_argument(
        "--growth-limit", type=float, default=5.0, help="RSS growth allowed after the warm-up, %%"
    )
    parser.add_argument("--link-cuts", action="store_true", help="the nodes' link cut again and again")
    parser.add_argument("--cut-every", type=float, default=240, help="seconds between two link cuts")
    parser.add_argument("--cut-seconds", type=float, default=20, help="how long each cut lasts")
    parser.add_argument("--think", type=float, default=0.05, help="seconds a client pauses between rounds")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/novacron"),
        help=f"PostgreSQL server to use (the database {DB_NAME} is created on it)",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("make soak needs root (network namespaces)", file=sys.stderr)
        return 2
    with two_hosts(TOPOLOGY) as topology:
        soak = Soak(args, topology)
        try:
            return soak.run()
        finally:
            mend(topology)
            soak.shutdown()


if __name__ == "__main__":
    sys.exit(main())
