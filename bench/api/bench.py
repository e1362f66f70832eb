"""API benchmark (issue 7, section 4): ``make bench-api``.

1. Creates a dedicated database (``novacron_bench`` beside ``DATABASE_URL``'s, dropped at the end
   unless ``--keep``), migrates it and seeds it with COPY: ``--users`` tenants with a token and a
   large quota, 100 nodes, 5 images, ``--vms`` VMs spread over the tenants and a year (10 % deleted),
   and a realistic monitoring volume (``--metrics`` node samples, ``--api-logs`` request logs).
2. EXPLAINs (ANALYZE) the queries of the VM list, detail and usage at that size: each must use an
   index and never scan ``vms``; their execution times are reported.
3. Starts the production server (granian, the ``Procfile``'s flags unless ``--granian`` says
   otherwise) on ``bench/api/timed_wsgi.py`` (the WSGI app with per-query timing) against a Redis
   database of its own (``--redis-url``, refused unless empty; flushed at the end), API throttles
   lifted, and runs wrk (``bench/api/scenario.lua``) for each scenario: the bare endpoint
   (``/healthz``), VM list cached and uncached, detail cached and uncached, POST batches of 10 and
   1000, and the mixed 90 % read / 10 % write load at 16, 64 and 256 connections (``--write-percent``
   sets the writes' share: 0 shows what they cost). With ``--streams N``
   (alone: 500) each mixed scenario runs alternately without and with N open migration-event streams
   on the streams service (``bench/api/streams.py``: one asyncio client, nodes' progress published
   twice a second), and reports whether each stream got every event. With ``--consoles N`` (alone:
   100) each mixed scenario runs alternately without and with N open VM consoles (with ``--streams``
   too, "with" holds both): ``bench/api/consoles.py`` asks the API for a ticket per console, opens the
   WebSockets on the streams service, types a command on each every 2 s and times its answer; the
   nodes are real DWCP servers and console managers in this process, the guests stand-ins on the VMs'
   console sockets (QEMU guests would take the CPU the load measures). The consoles are spread within
   the per-VM and per-user console limits (2 viewers per VM, 2 VMs per tenant) and over nodes of at
   most 50 (a node's DWCP server holds 64 sessions).
4. Prints the table (p50/p95/p99, throughput and its ratio to the bare endpoint of the same run,
   error rate, database query avg/p95 inside the scenario's window, server CPU and memory), then per
   run with streams their events received / expected, per run with consoles the consoles opened,
   commands answered / sent, answer latency (median, p95, max), output bytes and the CPU of this
   process (the clients, the consoles' nodes and guests: on a small machine they compete with the
   servers), and writes everything (each console's own figures too) as JSON under ``bench/results/``.

Run: ``make bench-api`` (``BENCH_ARGS="--quick"`` for a 100k-VM smoke run;
``BENCH_ARGS="--only mixed --streams 500 --consoles 100"`` for the mixed load beside 500 streams and
100 consoles). Needs PostgreSQL, Redis and ``wrk`` (``apt-get install -y wrk``). The machine is
shared: only ratios measured in one run compare.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import psutil

if TYPE_CHECKING:  # imported where used: run as a script, ROOT joins sys.path in main()
    from bench.api.consoles import ConsoleLoad, ConsoleNode
    from bench.api.streams import StreamLoad

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
LUA = Path(__file__).resolve().parent / "scenario.lua"
VENV_BIN = ROOT / ".venv" / "bin"
DEFAULT_GRANIAN = (
    "--workers 4 --blocking-threads 2 --backpressure 16 --http auto --http1-keep-alive"  # the Procfile's
)


@dataclass
class Scenario:
    name: str
    mode: str  # BENCH_MODE of scenario.lua
    lines: str  # which request lines (see _write_lines)
    connections: int
    duration: float
    batch: int = 0
    write_percent: int = 10  # mixed: the share of writes (BENCH_WRITE_PCT of scenario.lua)


@dataclass
class Result:
    scenario: str
    connections: int
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    error_rate: float
    errors: dict[str, int]
    db_queries: int
    db_queries_per_request: float
    db_avg_ms: float | None
    db_p95_ms: float | None
    server_cpu_percent: float
    postgres_cpu_percent: float
    machine_cpu_percent: float
    server_rss_mb: float
    load_average: float  # the machine's 1-minute load at the end (it is shared)
    ratio_to_bare: float | None = None
    items_per_second: float | None = None


@dataclass
class Run:
    started: str
    commit: str
    args: dict[str, Any]
    machine: dict[str, Any]
    seed_seconds: dict[str, float] = field(default_factory=dict)
    explain: list[dict[str, Any]] = field(default_factory=list)
    results: list[Result] = field(default_factory=list)
    streams: list[dict[str, Any]] = field(default_factory=list)  # --streams: each "with streams" run
    consoles: list[dict[str, Any]] = field(default_factory=list)  # --consoles: each "with consoles" run


def log(message: str) -> None:
    print(f"[bench-api {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- Database -------------------------------------------------------------------------------------


def _with_db(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def _admin(url: str, sql: str) -> None:
    import psycopg

    with psycopg.connect(_with_db(url, "postgres"), autocommit=True) as conn:
        conn.execute(sql)


def create_database(url: str, name: str) -> str:
    _admin(url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    _admin(url, f'CREATE DATABASE "{name}"')
    return _with_db(url, name)


def drop_database(url: str, name: str) -> None:
    _admin(url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _copy(table: str, columns: str, rows: Iterator[str]) -> None:
    from django.db import connection

    with connection.cursor() as cursor, cursor.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
        buffer = io.StringIO()
        for count, row in enumerate(rows, 1):
            buffer.write(row)
            if count % 50_000 == 0:
                copy.write(buffer.getvalue())
                buffer = io.StringIO()
        copy.write(buffer.getvalue())


@dataclass
class Seeded:
    tokens: list[str]  # tenant tokens, index = tenant number
    staff_token: str
    writer_token: str  # a tenant of its own for the batch scenarios
    vm_ids: dict[int, list[str]]  # a sample of live VM ids per tenant number
    tenant_ids: list[int]


def seed(args: argparse.Namespace, timings: dict[str, float]) -> Seeded:
    from django.contrib.auth import get_user_model
    from django.db import connection

    from apps.projects.models import Membership, Project, Role
    from apps.vms.models import Image, Node

    rng = random.Random(7)
    started = time.perf_counter()
    user_model = get_user_model()
    unusable = "!"  # tokens only: no password logs these users in
    users = user_model.objects.bulk_create(
        [user_model(username=f"tenant{i:05d}", password=unusable) for i in range(args.users)]
        + [
            user_model(username="bench-staff", password=unusable, is_staff=True),
            user_model(username="bench-writer", password=unusable),
        ]
    )
    tenants = users[: args.users]
    tokens = _issue_tokens(users)
    unlimited = {"max_vms": 10**8, "max_vcpus": 10**8, "max_memory_mb": 10**12}
    projects = Project.objects.bulk_create(
        [Project(name=f"~{user.username}", personal_of=user, **unlimited) for user in users]
    )
    Membership.objects.bulk_create(
        [
            Membership(project=project, user=user, role=Role.ADMIN)
            for project, user in zip(projects, users, strict=True)
        ]
    )
    nodes = Node.objects.bulk_create(
        [
            Node(
                name=f"node{i:03d}",
                address=f"10.0.{i // 250}.{i % 250 + 1}",
                dwcp_address=f"10.0.{i // 250}.{i % 250 + 1}:7000",
                vcpus=100_000,
                memory_mb=1 << 40,
                disk_gb=1 << 30,
            )
            for i in range(100)
        ]
    )
    images = Image.objects.bulk_create(
        [Image(name="bench-image", path="/var/lib/novacron/images/bench.qcow2")]
        + [Image(name=f"image-{i}", path=f"/var/lib/novacron/images/{i}.qcow2") for i in range(4)]
    )
    timings["users_nodes_images"] = time.perf_counter() - started

    started = time.perf_counter()
    year_ago = datetime.now(UTC) - timedelta(days=365)
    span = 365 * 24 * 3600
    states = ["running"] * 6 + ["stopped"] * 2 + ["error"]
    sample: dict[int, list[str]] = {}

    def vm_rows() -> Iterator[str]:
        for index in range(args.vms):
            tenant = index % len(tenants)
            vm_id = uuid.UUID(int=rng.getrandbits(128), version=4)
            deleted = rng.random() < 0.1
            state = "deleted" if deleted else states[rng.randrange(len(states))]
            created = year_ago + timedelta(seconds=span * index / args.vms)
            stamp = created.isoformat()
            deleted_at = stamp if deleted else "\\N"
            node = nodes[rng.randrange(len(nodes))].pk
            image = images[index % len(images)].pk
            if not deleted and len(sample.setdefault(tenant, [])) < 200:
                sample[tenant].append(str(vm_id))
            yield (
                f"{vm_id}\tvm-{index}\t{tenants[tenant].pk}\t{projects[tenant].pk}\t{node}\t{image}\t{state}\t\t\t"
                f"{1 + index % 8}\t{512 * (1 + index % 8)}\t{10 + index % 50}\t{stamp}\t{stamp}\t{deleted_at}\t"
                f"vm-{index}\t[]\t\n"
            )

    _copy(
        "vms",
        "id, name, owner_id, project_id, node_id, image_id, state, state_reason, pending_action, vcpus, "
        "memory_mb, disk_gb, created_at, updated_at, deleted_at, hostname, ssh_keys, user_data",
        vm_rows(),
    )
    timings["vms_copy"] = time.perf_counter() - started

    started = time.perf_counter()
    now = datetime.now(UTC)
    metric_names = ("node.cpu_percent", "node.memory_used_bytes", "node.memory_percent", "node.disk_percent")

    def metric_rows() -> Iterator[str]:
        per_round = len(nodes) * len(metric_names)
        for index in range(args.metrics):
            tick, rest = divmod(index, per_round)
            node, name = divmod(rest, len(metric_names))
            stamp = (now - timedelta(seconds=10 * tick)).isoformat()
            yield f"{stamp}\t{metric_names[name]}\t{rng.random() * 100:.3f}\t{nodes[node].pk}\t\\N\n"

    _copy("metrics", "timestamp, name, value, node_id, vm_id", metric_rows())
    endpoints = (
        ("GET", "/api/v1/vms/"),
        ("GET", "/api/v1/vms/{pk}/"),
        ("POST", "/api/v1/vms/"),
        ("GET", "/api/v1/users/me/"),
        ("POST", "/api/v1/vms/batch/"),
    )

    def api_log_rows() -> Iterator[str]:
        for index in range(args.api_logs):
            method, endpoint = endpoints[index % len(endpoints)]
            stamp = (now - timedelta(seconds=index * 0.05)).isoformat()
            status = 200 if index % 50 else 404
            user = tenants[index % len(tenants)].pk
            yield (
                f"{stamp}\t{method}\t{endpoint}\t{status}\t{rng.random() * 40:.3f}\t{rng.randrange(100, 30000)}"
                f"\t{uuid.uuid4().hex}\t{user}\n"
            )

    _copy(
        "api_logs",
        "timestamp, method, endpoint, status, duration_ms, response_bytes, request_id, user_id",
        api_log_rows(),
    )
    timings["metrics_api_logs_copy"] = time.perf_counter() - started
    started = time.perf_counter()
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE")
    timings["vacuum_analyze"] = time.perf_counter() - started
    return Seeded(
        tokens=tokens[: args.users],
        staff_token=tokens[-2],
        writer_token=tokens[-1],
        vm_ids=sample,
        tenant_ids=[user.pk for user in tenants],
    )


def explain(seeded: Seeded) -> list[dict[str, Any]]:
    """Plans and execution times of the read path's queries at this size (median of 20 runs).

    The list and detail queries are the fixed SQL the API runs (``apps/vms/reads.py``), with the
    parameters of a tenant's and of the staff's first page, a tenant's page in the middle of their
    list (a cursor), a state filter and one VM.
    """
    from django.contrib.auth import get_user_model
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from apps.projects.services import personal_project
    from apps.vms.models import VM
    from apps.vms.reads import PageShape, detail_sql, page_window
    from apps.vms.selectors import project_usage

    user_model = get_user_model()
    tenant = user_model.objects.get(pk=seeded.tenant_ids[1])
    project = personal_project(tenant).pk
    owned = (
        VM.objects.filter(project_id=project)
        .order_by("-created_at", "-id")
        .values_list("created_at", flat=True)
    )
    middle = owned[owned.count() // 2]  # the cursor of a page in the middle of the tenant's list
    detail_id = seeded.vm_ids[1][0]

    def shape(fleet: bool, state: str | None = None, position: str = "") -> str:
        # A page of 50 and one more, from the start.
        page = PageShape(fleet=fleet, state=state, position=position, reverse=False)
        return page_window(page, limit=51, offset=0)

    queries: dict[str, tuple[str, list[Any]]] = {
        "tenant list page 1": (shape(False), [project]),
        "tenant list, later page (cursor)": (shape(False, position="<"), [project, middle]),
        "tenant list ?state=stopped": (shape(False, state="stopped"), [project]),
        "staff list page 1": (shape(True), []),
        "staff list ?state=error": (shape(True, state="error"), []),
        "detail": (detail_sql(of_project=True), [detail_id, project]),
    }
    report = []
    for label, (sql, params) in queries.items():
        with connection.cursor() as cursor:
            cursor.execute(f"EXPLAIN ANALYZE {sql}", params)
            plan = "\n".join(row[0] for row in cursor.fetchall())
        report.append(_timed(label, plan, sql, params, connection))
    # users/me usage: an aggregate over the tenant's VMs (not a list: no LIMIT), the statement
    # ``project_usage`` runs (its parameters bound by psycopg on the client, as Django sends it)
    with CaptureQueriesContext(connection) as captured:
        project_usage(project_id=project)
    (usage,) = captured.captured_queries
    with connection.cursor() as cursor:
        cursor.execute(f"EXPLAIN ANALYZE {usage['sql']}")
        plan = "\n".join(row[0] for row in cursor.fetchall())
    samples = []
    for _ in range(20):
        started = time.perf_counter()
        project_usage(project_id=project)
        samples.append((time.perf_counter() - started) * 1000)
    report.append(
        {
            "query": "users/me usage (aggregate)",
            "uses_index": "Index" in plan,
            "seq_scan_on_vms": "Seq Scan on vms" in plan,
            "median_ms": round(statistics.median(samples), 3),
            "p95_ms": round(sorted(samples)[18], 3),
            "plan": plan,
        }
    )
    return report


def _timed(label: str, plan: str, sql: str, params: Any, connection: Any) -> dict[str, Any]:
    samples = []
    with connection.cursor() as cursor:
        for _ in range(20):
            started = time.perf_counter()
            cursor.execute(sql, params)
            cursor.fetchall()
            samples.append((time.perf_counter() - started) * 1000)
    return {
        "query": label,
        "uses_index": "Index" in plan,
        "seq_scan_on_vms": "Seq Scan on vms" in plan,
        "median_ms": round(statistics.median(samples), 3),
        "p95_ms": round(sorted(samples)[18], 3),
        "plan": plan,
    }


# --- Server ---------------------------------------------------------------------------------------


class Server:
    """granian on the timed WSGI app (or, for ``--streams``, the streams service's ASGI app); CPU and
    memory of its process tree sampled while it runs."""

    def __init__(
        self,
        port: int,
        granian_args: str,
        env: dict[str, str],
        query_dir: str,
        *,
        interface: str = "wsgi",
        app: str = "bench.api.timed_wsgi:application",
    ) -> None:
        self.port = port
        self.query_dir = query_dir
        command = [
            str(VENV_BIN / "granian"),
            "--interface",
            interface,
            app,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            *granian_args.split(),
        ]
        if interface == "wsgi":
            command.append("--no-ws")  # as the Procfile's web; the streams service serves WebSockets
        self.command = command
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True)
        self._peak_rss = 0.0
        self._sampling = threading.Event()
        self._sampler = threading.Thread(target=self._sample_rss, daemon=True)
        self._sampler.start()

    def tree(self) -> list[psutil.Process]:
        try:
            parent = psutil.Process(self.process.pid)
            return [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def cpu_seconds(self) -> float:
        total = 0.0
        for proc in self.tree():
            with contextlib.suppress(psutil.NoSuchProcess):
                times = proc.cpu_times()
                total += times.user + times.system
        return total

    def rss_mb(self) -> float:
        total = 0
        for proc in self.tree():
            with contextlib.suppress(psutil.NoSuchProcess):
                total += proc.memory_info().rss
        return total / 1e6

    def _sample_rss(self) -> None:
        while not self._sampling.wait(0.25):
            self._peak_rss = max(self._peak_rss, self.rss_mb())

    def take_peak_rss(self) -> float:
        peak, self._peak_rss = max(self._peak_rss, self.rss_mb()), 0.0
        return peak

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"granian exited with {self.process.returncode}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2),
            ):
                return
            time.sleep(0.3)
        raise SystemExit("granian did not answer /healthz within a minute")

    def stop(self) -> None:
        self._sampling.set()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def queries_between(self, start: float, end: float) -> list[float]:
        """Durations (ms) of the queries that ended inside [start, end] (after the files are flushed)."""
        import array

        durations: list[float] = []
        for path in Path(self.query_dir).glob("queries-*.f64"):
            values = array.array("d")
            values.frombytes(path.read_bytes())
            for index in range(0, len(values) - 1, 2):
                if start <= values[index] <= end:
                    durations.append(values[index + 1] * 1000)
        return durations


def _postgres_cpu_seconds(database: str) -> float:
    """CPU of the PostgreSQL backends serving ``database`` (others' backends are not counted)."""
    total = 0.0
    for proc in psutil.process_iter(["name", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            cmdline = " ".join(proc.info["cmdline"] or [])
            if cmdline.startswith("postgres:") and f" {database} " in f"{cmdline} ":
                times = proc.cpu_times()
                total += times.user + times.system
    return total


# --- Load -----------------------------------------------------------------------------------------


def _write_lines(directory: Path, seeded: Seeded) -> dict[str, Path]:
    """Request lines ("<token>\\t<path>") per kind of scenario."""
    user = 1  # the reading tenant of the single-user scenarios
    files = {
        "bare": ["-\t/healthz"],
        "list": [f"{seeded.tokens[user]}\t/api/v1/vms/"],
        "detail": [f"{seeded.tokens[user]}\t/api/v1/vms/{vm_id}/" for vm_id in seeded.vm_ids[user]],
        "mixed": [],
    }
    for tenant in range(min(100, len(seeded.tokens))):
        token = seeded.tokens[tenant]
        files["mixed"].append(f"{token}\t/api/v1/vms/")
        files["mixed"] += [f"{token}\t/api/v1/vms/{vm_id}/" for vm_id in seeded.vm_ids[tenant][:4]]
    paths = {}
    for name, lines in files.items():
        path = directory / f"{name}.lines"
        path.write_text("\n".join(lines) + "\n")
        paths[name] = path
    return paths


def run_wrk(
    scenario: Scenario, url: str, lines: dict[str, Path], writer_token: str, run_id: str, threads: int
) -> dict[str, Any]:
    env = dict(
        os.environ,
        BENCH_MODE=scenario.mode,
        BENCH_LINES=str(lines[scenario.lines]),
        BENCH_BATCH=str(scenario.batch),
        BENCH_WRITE_PCT=str(scenario.write_percent),
        BENCH_TOKEN=writer_token,
        BENCH_RUN=run_id
        + "".join(ch for ch in scenario.name if ch.isalnum())[:12]
        + str(scenario.connections),
    )
    command = [
        "wrk",
        f"-t{min(threads, scenario.connections)}",
        f"-c{scenario.connections}",
        f"-d{max(1, round(scenario.duration))}s",
        "--timeout",
        "10s",
        "-s",
        str(LUA),
        url,
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            return dict(json.loads(line.removeprefix("BENCH_RESULT ")))
    raise SystemExit(f"wrk exited with {done.returncode} and no result:\n{done.stdout}\n{done.stderr}")


def measure(
    scenario: Scenario,
    server: Server,
    database: str,
    url: str,
    lines: dict[str, Path],
    writer_token: str,
    run_id: str,
    threads: int,
) -> Result:
    server.take_peak_rss()
    psutil.cpu_percent()  # starts the machine-wide interval
    cpu0, pg0, start = server.cpu_seconds(), _postgres_cpu_seconds(database), time.time()
    raw = run_wrk(scenario, url, lines, writer_token, run_id, threads)
    end = time.time()
    cpu1, pg1 = server.cpu_seconds(), _postgres_cpu_seconds(database)
    machine = psutil.cpu_percent()
    rss = server.take_peak_rss()
    time.sleep(1.2)  # the server's query files are flushed every 0.5 s
    queries = server.queries_between(start, end)
    seconds = raw["duration_us"] / 1e6
    errors = {key.removeprefix("errors_"): value for key, value in raw.items() if key.startswith("errors_")}
    failed = errors["status"] + errors["connect"] + errors["read"] + errors["write"] + errors["timeout"]
    requests = raw["requests"]
    ordered = sorted(queries)
    return Result(
        scenario=scenario.name,
        connections=scenario.connections,
        requests=requests,
        seconds=round(seconds, 2),
        rps=round(requests / seconds, 1),
        p50_ms=raw["p50_us"] / 1000,
        p95_ms=raw["p95_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        error_rate=round(failed / max(requests, 1), 6),
        errors=errors,
        db_queries=len(queries),
        db_queries_per_request=round(len(queries) / max(requests, 1), 2),
        db_avg_ms=round(statistics.fmean(queries), 3) if queries else None,
        db_p95_ms=round(ordered[int(0.95 * (len(ordered) - 1))], 3) if queries else None,
        server_cpu_percent=round(100 * (cpu1 - cpu0) / (end - start), 1),
        postgres_cpu_percent=round(100 * (pg1 - pg0) / (end - start), 1),
        machine_cpu_percent=round(machine * (psutil.cpu_count() or 1), 1),
        server_rss_mb=round(rss, 1),
        load_average=round(os.getloadavg()[0], 1),
        items_per_second=round(requests * scenario.batch / seconds, 1) if scenario.batch else None,
    )


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    d = args.duration
    c = args.connections
    w = args.write_percent
    return [
        Scenario("bare /healthz", "get", "bare", c, d),
        Scenario("vm list cached", "get", "list", c, d),
        Scenario("vm list uncached", "get-bust", "list", c, d),
        Scenario("vm detail cached", "get", "detail", c, d),
        Scenario("vm detail uncached", "get-bust", "detail", c, d),
        Scenario("POST batch of 10", "batch", "list", 4, d, batch=10),
        Scenario("POST batch of 1000", "batch", "list", 2, max(d, 20), batch=1000),
        *(
            Scenario(f"mixed {100 - w}/{w}", "mixed", "mixed", conns, d, write_percent=w)
            for conns in (16, 64, 256)
        ),
    ]


# --- Report ---------------------------------------------------------------------------------------


def table(run: Run) -> str:
    header = (
        "| scenario | conns | p50 ms | p95 ms | p99 ms | req/s | vs bare | errors | DB q/req | DB avg ms "
        "| DB p95 ms | server CPU % | PG CPU % | machine CPU % | server RSS MB | load |"
    )
    lines = [header, "|" + "---|" * 16]
    for r in run.results:
        ratio = f"{r.ratio_to_bare:.1%}" if r.ratio_to_bare is not None else "-"
        rps = f"{r.rps:,.0f}" + (f" ({r.items_per_second:,.0f} VMs/s)" if r.items_per_second else "")
        db_avg = f"{r.db_avg_ms:.2f}" if r.db_avg_ms is not None else "-"
        db_p95 = f"{r.db_p95_ms:.2f}" if r.db_p95_ms is not None else "-"
        lines.append(
            f"| {r.scenario} | {r.connections} | {r.p50_ms:.1f} | {r.p95_ms:.1f} | {r.p99_ms:.1f} | {rps} "
            f"| {ratio} | {r.error_rate:.3%} | {r.db_queries_per_request} | {db_avg} | {db_p95} "
            f"| {r.server_cpu_percent:.0f} | {r.postgres_cpu_percent:.0f} | {r.machine_cpu_percent:.0f} "
            f"| {r.server_rss_mb:.0f} | {r.load_average:.1f} |"
        )
    return "\n".join(lines)


def streams_table(reports: list[dict[str, Any]]) -> str:
    lines = [
        "| with streams | opened | migrations | events published | received / expected | streams with every "
        "event | min / median share | streams server CPU % | RSS MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        lines.append(
            f"| {r['scenario']} | {r['opened']}/{r['streams']} | {r['migrations']} | {r['published']:,} "
            f"| {r['received']:,} / {r['expected']:,} | {r['complete']}/{r['streams']} "
            f"| {r['min_ratio']:.1%} / {r['median_ratio']:.1%} | {r['server_cpu_percent']:.0f} "
            f"| {r['server_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def consoles_table(reports: list[dict[str, Any]]) -> str:
    def ms(value: float | None) -> str:
        return f"{value:.0f}" if value is not None else "-"

    lines = [
        "| with consoles | opened | VMs | commands answered / sent | consoles with every answer "
        "| answer ms median / p95 / max | output bytes (least per console) | streams server CPU % | RSS MB "
        "| bench process CPU % |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        lines.append(
            f"| {r['scenario']} | {r['opened']}/{r['consoles']} | {r['vms']} | {r['answered']:,} / {r['sent']:,} "
            f"| {r['complete']}/{r['consoles']} | {ms(r['latency_median_ms'])} / {ms(r['latency_p95_ms'])} / "
            f"{ms(r['latency_max_ms'])} | {r['output_bytes']:,} ({r['min_output_bytes']:,}) "
            f"| {r['server_cpu_percent']:.0f} | {r['server_rss_mb']:.0f} | {r['bench_cpu_percent']:.0f} |"
        )
    return "\n".join(lines)


def explain_table(report: list[dict[str, Any]]) -> str:
    lines = [
        "| query at seed size | index used | seq scan on vms | median ms | p95 ms |",
        "|---|---|---|---|---|",
    ]
    for row in report:
        lines.append(
            f"| {row['query']} | {'yes' if row['uses_index'] else 'NO'} | "
            f"{'YES' if row['seq_scan_on_vms'] else 'no'} | {row['median_ms']} | {row['p95_ms']} |"
        )
    return "\n".join(lines)


def _alternation(args: argparse.Namespace, scenario: Scenario) -> list[bool]:
    """Whether each run of ``scenario`` holds the streams and consoles: the mixed ones alternate
    without/with."""
    if not (args.streams or args.consoles) or scenario.mode != "mixed":
        return [False]
    return [False, True] * max(1, args.rounds)


class _Beside:
    """The streams service and what is held open on it in the runs "with": ``--streams`` (the streams
    and their migrations) and ``--consoles`` (the consoles, their VMs and nodes)."""

    def __init__(self, args: argparse.Namespace, env: dict[str, str], seeded: Seeded, query_dir: str) -> None:
        from bench.api.streams import MIGRATIONS, StreamLoad, make_migrations

        self.migration_ids: list[str] = []
        self.nodes: list[ConsoleNode] = []
        # Consoles are streams too (STREAMS_MAX_*); the console limits stay as they are (the spread).
        held = args.streams + args.consoles + 10
        limits = {"STREAMS_MAX_PER_USER": str(held), "STREAMS_MAX_PER_PROCESS": str(held)}
        self.server = Server(
            args.port + 1,
            "--workers 1 --http auto",
            env | limits,
            query_dir,
            interface="asgi",
            app="novacron.asgi:application",
        )
        self.server.wait_ready()
        log(f"streams service: {' '.join(self.server.command[1:])}")
        self.streams: StreamLoad | None = None
        if args.streams:
            tenant = next(index for index, ids in seeded.vm_ids.items() if ids)
            self.migration_ids = make_migrations(seeded.vm_ids[tenant], MIGRATIONS)
            self.streams = StreamLoad(
                base=f"http://127.0.0.1:{args.port + 1}",
                redis_url=env["REDIS_URL"],
                token=seeded.tokens[tenant],
                migration_ids=self.migration_ids,
                count=args.streams,
            )
        self.consoles = self._consoles(args, env, seeded) if args.consoles else None
        self.stream_reports: list[dict[str, Any]] = []
        self.console_reports: list[dict[str, Any]] = []

    def _consoles(self, args: argparse.Namespace, env: dict[str, str], seeded: Seeded) -> ConsoleLoad:
        """The console nodes (in this process), their VMs' rows owned by the last tenants (not those
        of the mixed load), and the load's consoles over them."""
        from bench.api.consoles import (
            NAME_PREFIX,
            ConsoleLoad,
            ConsoleNode,
            ConsoleSlot,
            Spread,
            register_rows,
            remove_rows,
        )

        spread = Spread(args.consoles)
        if spread.users > len(seeded.tokens):
            raise SystemExit(f"--consoles {args.consoles} needs {spread.users} tenants; --users gives fewer")
        first_owner = len(seeded.tokens) - spread.users
        vm_ids = [str(uuid.uuid4()) for _ in range(spread.vms)]
        owners = {vm_id: first_owner + spread.user_of(vm) for vm, vm_id in enumerate(vm_ids)}
        remove_rows()  # a kept database's, from a run that failed
        for number in range(spread.nodes):
            mine = [vm_id for vm, vm_id in enumerate(vm_ids) if spread.node_of(vm) == number]
            node = ConsoleNode(f"{NAME_PREFIX}-{number}", mine, env["DWCP_SECRET"])
            self.nodes.append(node)
            register_rows(node, {vm_id: seeded.tenant_ids[owners[vm_id]] for vm_id in mine})
        log(
            f"consoles: {args.consoles} over {spread.vms} VMs of {spread.users} tenants; their nodes' DWCP: "
            f"{', '.join(node.server.address_text for node in self.nodes)}"
        )
        slots = [
            ConsoleSlot(vm_ids[spread.vm_of(index)], seeded.tokens[owners[vm_ids[spread.vm_of(index)]]])
            for index in range(args.consoles)
        ]
        return ConsoleLoad(api=f"http://127.0.0.1:{args.port}", slots=slots)

    def measure(
        self,
        scenario: Scenario,
        server: Server,
        args: argparse.Namespace,
        url: str,
        lines: dict[str, Path],
        seeded: Seeded,
        run_id: str,
    ) -> Result:
        held = " + ".join(
            part
            for part, wanted in (
                (f"{args.streams} streams", args.streams),
                (f"{args.consoles} consoles", args.consoles),
            )
            if wanted
        )
        log(f"{scenario.name} at {scenario.connections} connections with {held} open")
        if self.streams is not None:
            self.streams.open()
            log(f"  {self.streams.opened}/{args.streams} streams open")
        if self.consoles is not None:
            self.consoles.open()
            log(f"  {self.consoles.opened}/{args.consoles} consoles open")
        self.server.take_peak_rss()
        bench = psutil.Process()
        cpu0, bench0, start = self.server.cpu_seconds(), sum(bench.cpu_times()[:2]), time.time()
        with contextlib.ExitStack() as holding:
            published = holding.enter_context(self.streams.publishing()) if self.streams is not None else None
            if self.consoles is not None:
                holding.enter_context(self.consoles.typing())
            result = measure(
                scenario, server, args.database, url, lines, seeded.writer_token, run_id, args.threads
            )
        seconds = time.time() - start
        cpu = 100 * (self.server.cpu_seconds() - cpu0) / seconds
        bench_cpu = 100 * (sum(bench.cpu_times()[:2]) - bench0) / seconds
        rss = self.server.take_peak_rss()
        result.scenario = f"{scenario.name} + {held}"
        summary = f"  {result.rps:,.0f} req/s, p95 {result.p95_ms:.1f} ms, errors {result.error_rate:.3%}"
        if self.streams is not None and published is not None:
            report = self.streams.report(published, rss_mb=rss, cpu_percent=cpu)
            self.streams.close()
            self.stream_reports.append(
                {"scenario": result.scenario, "connections": scenario.connections, **asdict(report)}
            )
            summary += (
                f"; streams: {report.complete}/{report.streams} got every event "
                f"({report.received:,}/{report.expected:,})"
            )
        if self.consoles is not None:
            answers = self.consoles.report(rss_mb=rss, cpu_percent=cpu, bench_cpu_percent=bench_cpu)
            self.consoles.close()
            self.console_reports.append(
                {"scenario": result.scenario, "connections": scenario.connections, **asdict(answers)}
            )
            summary += (
                f"; consoles: {answers.answered:,}/{answers.sent:,} commands answered, "
                f"p95 {answers.latency_p95_ms} ms"
            )
        log(summary)
        return result

    def stop(self) -> None:
        if self.streams is not None:
            self.streams.stop()
        if self.consoles is not None:
            self.consoles.stop()
        self.server.stop()
        for node in self.nodes:
            node.stop()
        from bench.api.streams import remove_migrations

        remove_migrations(self.migration_ids)
        if self.nodes:
            from bench.api.consoles import remove_rows

            remove_rows()


def _git_commit() -> str:
    with contextlib.suppress(subprocess.CalledProcessError, FileNotFoundError):
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vms", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--metrics", type=int, default=1_000_000)
    parser.add_argument("--api-logs", type=int, default=1_000_000)
    parser.add_argument("--duration", type=float, default=15, help="seconds per scenario")
    parser.add_argument("--connections", type=int, default=64, help="connections of the single-endpoint runs")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--granian", default=DEFAULT_GRANIAN, help="granian flags after the app")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/novacron"),
        help="server and credentials; the database name is replaced by --database",
    )
    parser.add_argument("--database", default="novacron_bench")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/12", help="an empty Redis database")
    parser.add_argument("--only", default="", help="comma-separated scenario name prefixes to run")
    parser.add_argument("--keep", action="store_true", help="keep the database (and reuse it with --reuse)")
    parser.add_argument("--reuse", action="store_true", help="skip seeding: use the kept database")
    parser.add_argument("--quick", action="store_true", help="100k VMs, 5 s per scenario")
    parser.add_argument(
        "--streams",
        type=int,
        nargs="?",
        const=500,
        default=0,
        help="also run each mixed scenario with N open migration-event streams (alone: 500), alternating",
    )
    parser.add_argument(
        "--consoles",
        type=int,
        nargs="?",
        const=100,
        default=0,
        help="also run each mixed scenario with N open VM consoles (alone: 100), alternating; with --streams, "
        "the runs 'with' hold both",
    )
    parser.add_argument(
        "--write-percent",
        type=int,
        default=10,
        choices=range(101),
        metavar="W",
        help="mixed: the share of writes in percent (default 10; 0 shows what the writes cost)",
    )
    parser.add_argument(
        "--rounds", type=int, default=2, help="--streams/--consoles: without/with alternations per scenario"
    )
    args = parser.parse_args()
    if args.quick:
        args.vms, args.metrics, args.api_logs, args.duration = 100_000, 200_000, 100_000, 5
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install -y wrk")

    import redis

    bench_redis = redis.Redis.from_url(args.redis_url)
    if bench_redis.dbsize():
        raise SystemExit(f"{args.redis_url} is not empty; give --redis-url an unused database")

    run = Run(
        started=datetime.now(UTC).isoformat(timespec="seconds"),
        commit=_git_commit(),
        args=vars(args),
        machine={
            "cpus": psutil.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
            "load_average_at_start": os.getloadavg(),
        },
    )
    database_url = (
        _with_db(args.database_url, args.database)
        if args.reuse
        else create_database(args.database_url, args.database)
    )
    query_dir = tempfile.mkdtemp(prefix="novacron-bench-")
    prometheus_dir = tempfile.mkdtemp(prefix="novacron-bench-prom-")
    env = dict(
        os.environ,
        DATABASE_URL=database_url,
        REDIS_URL=args.redis_url,
        CACHE_KEY_PREFIX="novacron-bench",
        SECRET_KEY="bench-only-secret-key",  # noqa: S106 (a throw-away server on 127.0.0.1)
        DEBUG="0",
        ALLOWED_HOSTS="127.0.0.1,localhost",
        # The benchmark measures the server, not the per-user rate limit.
        THROTTLE_USER="100000000/min",
        THROTTLE_ANON="100000000/min",
        THROTTLE_CONSOLE="100000000/min",
        STREAMS_URL=f"http://127.0.0.1:{args.port + 1}",  # the console tickets' WebSocket URLs
        DWCP_SECRET="bench-only-dwcp-secret",  # noqa: S106 (the streams service and the bench's nodes)
        LOG_LEVEL="WARNING",
        DJANGO_SETTINGS_MODULE="novacron.settings.main",
        NOVACRON_BENCH_QUERY_DIR=query_dir,
        PROMETHEUS_MULTIPROC_DIR=prometheus_dir,
    )
    os.environ.update(env)
    sys.path.insert(0, str(ROOT))
    import django
    from django.core.management import call_command

    django.setup()
    server: Server | None = None
    try:
        log(f"migrating {args.database}")  # a kept database gets this commit's new indexes too
        call_command("migrate", verbosity=0)
        if not args.reuse:
            log(
                f"seeding {args.vms:,} VMs, {args.metrics:,} metric samples, {args.api_logs:,} API logs (COPY)"
            )
            seeded = seed(args, run.seed_seconds)
            log(f"seeded in {sum(run.seed_seconds.values()):.0f} s: {run.seed_seconds}")
        else:
            log(f"removed {_remove_earlier_writes():,} VMs created by earlier runs' write scenarios")
            seeded = _reseeded_from_database()
        run.explain = explain(seeded)
        print(explain_table(run.explain), flush=True)
        from django.db import connections

        connections.close_all()

        with tempfile.TemporaryDirectory(prefix="novacron-bench-lines-") as directory:
            lines = _write_lines(Path(directory), seeded)
            server = Server(args.port, args.granian, env, query_dir)
            server.wait_ready()
            url = f"http://127.0.0.1:{args.port}"
            run_id = uuid.uuid4().hex[:6]
            log(f"granian: {' '.join(server.command[1:])}")
            # Warm-up: connection pools, imports, the cached list.
            run_wrk(Scenario("warm-up", "get", "list", 8, 3), url, lines, seeded.writer_token, run_id, 2)
            wanted = [prefix.strip() for prefix in args.only.split(",") if prefix.strip()]
            load = _Beside(args, env, seeded, query_dir) if args.streams or args.consoles else None
            try:
                for scenario in scenarios(args):
                    if wanted and not any(scenario.name.startswith(prefix) for prefix in wanted):
                        continue
                    for index, streams in enumerate(_alternation(args, scenario)):
                        # Each run of an alternation names the VMs it creates apart (the same names: 400).
                        run_id = uuid.uuid4().hex[:6] if index else run_id
                        if streams:
                            assert load is not None
                            run.results.append(
                                load.measure(scenario, server, args, url, lines, seeded, run_id)
                            )
                            run.streams += load.stream_reports[-1:] if args.streams else []
                            run.consoles += load.console_reports[-1:] if args.consoles else []
                            continue
                        log(
                            f"{scenario.name} at {scenario.connections} connections for {scenario.duration:.0f} s"
                        )
                        result = measure(
                            scenario,
                            server,
                            args.database,
                            url,
                            lines,
                            seeded.writer_token,
                            run_id,
                            args.threads,
                        )
                        run.results.append(result)
                        log(
                            f"  {result.rps:,.0f} req/s, p95 {result.p95_ms:.1f} ms, errors {result.error_rate:.3%}"
                        )
            finally:
                if load is not None:
                    load.stop()
        bare = next((r.rps for r in run.results if r.scenario.startswith("bare")), None)
        for result in run.results:
            result.ratio_to_bare = round(result.rps / bare, 4) if bare else None
    finally:
        if server is not None:
            server.stop()
        from django.db import connections

        connections.close_all()
        bench_redis.flushdb()
        shutil.rmtree(query_dir, ignore_errors=True)
        shutil.rmtree(prometheus_dir, ignore_errors=True)
        if not args.keep:
            drop_database(args.database_url, args.database)

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"api-{run.started.replace(':', '')}-{run.commit}.json"
    out.write_text(json.dumps(asdict(run), indent=2, default=str) + "\n")
    print()
    print(
        f"NovaCron API benchmark, {run.started}, commit {run.commit}, {args.vms:,} VMs, granian {args.granian}"
    )
    print(table(run))
    if run.streams:
        print()
        print(streams_table(run.streams))
    if run.consoles:
        print()
        print(consoles_table(run.consoles))
    print()
    print(explain_table(run.explain))
    print(f"\nJSON: {out.relative_to(ROOT)}")


def _remove_earlier_writes() -> int:
    """Remove the VMs (and batches) earlier runs' write scenarios created; give their capacity back.

    A kept database would otherwise carry every earlier run's creates: the batch writer's VMs
    (350k after a few runs) made each create's quota aggregate slower run after run (batch of 10 at
    33 req/s, then 6), and marking them deleted instead left the staff list walking past them
    (page 1 at 15 ms instead of 2). ``metrics.vm_id`` has no index (metrics are written far more
    often than VMs are removed), so its foreign-key check would scan the metrics once per VM: an
    index is made for the removal and dropped after it.
    """
    from django.db import connection, transaction

    mine = (
        "SELECT id FROM vms WHERE owner_id = (SELECT id FROM auth_user WHERE username = 'bench-writer') "
        r"OR name ~ '^m[0-9a-f]{6}mixed\d+-\d+-\d+$'"
    )
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("CREATE INDEX bench_metrics_vm_idx ON metrics (vm_id)")
        cursor.execute(f"CREATE TEMPORARY TABLE bench_gone ON COMMIT DROP AS {mine}")
        cursor.execute("DELETE FROM nics WHERE vm_id IN (SELECT id FROM bench_gone)")  # their addresses
        cursor.execute("DELETE FROM batch_items WHERE vm_id IN (SELECT id FROM bench_gone)")
        cursor.execute(
            "DELETE FROM batch_operations b WHERE owner_id = (SELECT id FROM auth_user WHERE username = "
            "'bench-writer') AND NOT EXISTS (SELECT 1 FROM batch_items i WHERE i.batch_id = b.id)"
        )
        cursor.execute("DELETE FROM vms WHERE id IN (SELECT id FROM bench_gone)")
        removed = cursor.rowcount
        cursor.execute(
            "UPDATE nodes n SET allocated_vcpus = coalesce(s.vcpus, 0), "
            "allocated_memory_mb = coalesce(s.memory_mb, 0), allocated_disk_gb = coalesce(s.disk_gb, 0) "
            "FROM (SELECT n2.id, sum(v.vcpus) AS vcpus, sum(v.memory_mb) AS memory_mb, sum(v.disk_gb) AS disk_gb "
            "FROM nodes n2 LEFT JOIN vms v ON v.node_id = n2.id AND v.state <> 'deleted' GROUP BY n2.id) s "
            "WHERE s.id = n.id"
        )
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")  # the checks run now, on the index
        cursor.execute("DROP INDEX bench_metrics_vm_idx")
    with connection.cursor() as cursor:
        cursor.execute("VACUUM (ANALYZE) vms")
    return removed


def _issue_tokens(users: list[Any]) -> list[str]:
    """New API token secrets of ``users``, in their order, written by one COPY; the users' earlier
    bench tokens are dropped (the database keeps digests only, so a kept database's cannot be reused)."""
    from apps.accounts.models import ApiToken, new_secret
    from apps.core.db import bulk_insert

    ApiToken.objects.filter(user__in=users, name="bench").delete()
    secrets = [new_secret() for _ in users]
    bulk_insert(
        [
            ApiToken.for_secret(secret, user_id=user.pk, name="bench")
            for secret, user in zip(secrets, users, strict=True)
        ]
    )
    return secrets


def _reseeded_from_database() -> Seeded:
    """New tokens and the VM samples of a database kept by an earlier ``--keep`` run."""
    from django.contrib.auth import get_user_model

    from apps.vms.models import VM

    tenants = list(get_user_model().objects.filter(username__startswith="tenant").order_by("username"))
    samples: dict[int, list[str]] = {}
    for index, tenant in enumerate(tenants[:100]):
        samples[index] = [
            str(pk)
            for pk in VM.objects.filter(project__personal_of=tenant)
            .exclude(state="deleted")
            .values_list("pk", flat=True)[:200]
        ]
    operators = [get_user_model().objects.get(username=name) for name in ("bench-staff", "bench-writer")]
    tokens = _issue_tokens([*tenants, *operators])
    return Seeded(
        tokens=tokens[: len(tenants)],
        staff_token=tokens[-2],
        writer_token=tokens[-1],
        vm_ids=samples,
        tenant_ids=[tenant.pk for tenant in tenants],
    )


if __name__ == "__main__":
    main()
