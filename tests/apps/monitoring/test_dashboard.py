"""The operator page in a real browser: headless Chromium renders /dashboard/ from the live server.

Chromium's command line cannot carry a cookie, so the test puts a small forwarding proxy in front of
the live server that adds the staff session cookie to every request (page, script, data refresh),
and another, streaming, in front of the streams service (the migration bars' event streams).
The screenshot is kept under artifacts/ (git-ignored).
"""

import http.client
import json
import shutil
import subprocess
import tempfile
import threading
import time
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis
from django.conf import settings
from django.db import connection, transaction
from django.test import Client
from django.utils import timezone

from apps.migrations.choices import MigrationStatus
from apps.migrations.models import Migration
from apps.migrations.services.state import locked, transition
from apps.monitoring.models import Alert, AlertRule, Metric
from apps.vms.models import VM
from tests.apps.consoles.browser import HEADLESS_ARGS
from tests.streams_server import launch_streams
from workers import contract

__all__ = ["launch_streams"]  # a fixture of this module's tests

ROOT = Path(__file__).resolve().parents[3]
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)"),
]


def _cookie_proxy(target: str, cookie: str, *, streaming: bool = False) -> ThreadingHTTPServer:
    """A proxy adding ``cookie``; ``streaming``: each piece of the answer passed on as it comes (SSE)."""
    upstream = urlsplit(target)

    class Forward(BaseHTTPRequestHandler):
        def do_GET(self):
            connection = http.client.HTTPConnection(
                upstream.hostname or "127.0.0.1", upstream.port, timeout=30
            )
            headers = {k: v for k, v in self.headers.items() if k.lower() not in {"cookie", "connection"}}
            headers["Cookie"] = cookie
            connection.request("GET", self.path, headers=headers)
            answer = connection.getresponse()
            if streaming:
                self.send_response(answer.status)
                for name, value in answer.getheaders():
                    if name.lower() not in {"transfer-encoding", "connection", "content-length"}:
                        self.send_header(name, value)
                self.end_headers()  # HTTP/1.0: the body ends when the connection closes
                while piece := answer.read1(65536):
                    self.wfile.write(piece)
                    self.wfile.flush()
                connection.close()
                return
            body = answer.read()
            self.send_response(answer.status)
            for name, value in answer.getheaders():
                if name.lower() not in {"transfer-encoding", "connection", "content-length"}:
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            connection.close()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Forward)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _chromium(*args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [
                str(CHROMIUM),
                *HEADLESS_ARGS,
                f"--user-data-dir={profile}",
                "--virtual-time-budget=4000",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=90,
        )


@pytest.fixture
def fleet(make_user, make_node, make_image):
    staff = make_user("operator", staff=True)
    source = make_node("node-a", allocated_vcpus=6, allocated_memory_mb=8192)
    dest = make_node("node-b")
    vm = VM.objects.create(
        name="db-1",
        owner=staff,
        node=source,
        image=make_image(),
        state="running",
        vcpus=2,
        memory_mb=2048,
        disk_gb=10,
    )
    migration = Migration.objects.create(
        vm=vm, source_node=source, dest_node=dest, status="transferring", phase="memory"
    )
    if hasattr(migration, "percent"):
        Migration.objects.filter(pk=migration.pk).update(percent=42.0)
    now = timezone.now()
    Metric.objects.bulk_create(
        Metric(
            timestamp=now - timedelta(minutes=minute), name="node.cpu_percent", value=20 + minute, node=source
        )
        for minute in range(30)
    )
    rule = AlertRule.objects.get(metric="node.cpu_percent")
    Alert.objects.create(
        rule=rule,
        subject="node-a",
        severity=rule.severity,
        value=91.0,
        message="Node CPU above 70% on node-a",
        started_at=now,
    )
    return staff


def test_the_dashboard_renders_capacity_migrations_alerts_and_charts_in_chromium(live_server, fleet):
    browser = Client()
    browser.force_login(fleet)
    cookie = f"sessionid={browser.cookies['sessionid'].value}"
    proxy = _cookie_proxy(live_server.url, cookie)
    url = f"http://127.0.0.1:{proxy.server_port}/dashboard/"
    try:
        dom = _chromium("--dump-dom", url)
        assert dom.returncode == 0, dom.stderr[-2000:]
        html = dom.stdout
        assert 'data-rendered="yes"' in html, "the page's script did not run"
        assert "NovaCron operations" in html
        assert "node-a" in html and "node-b" in html  # node capacity table
        assert "db-1" in html and "transferring" in html and 'role="progressbar"' in html
        assert "Node CPU above 70%" in html  # firing alert
        assert html.count('class="chart"') == 6 and "<path" in html  # SVG chart with data
        ARTIFACTS.mkdir(exist_ok=True)
        screenshot = ARTIFACTS / "dashboard.png"
        screenshot.unlink(missing_ok=True)
        shot = _chromium(f"--screenshot={screenshot}", url)
        assert shot.returncode == 0, shot.stderr[-2000:]
        assert screenshot.stat().st_size > 10_000
    finally:
        proxy.shutdown()


def _publish_as_a_node_then_complete(migration: Migration) -> None:
    """Once the page's stream listens: progress as a source node publishes it, then the end."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    channel = contract.MIGRATION_EVENTS_CHANNEL.format(id=migration.pk)
    deadline = time.monotonic() + 60
    while dict(client.pubsub_numsub(channel)).get(channel.encode(), 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    for percent in (55.0, 77.5):
        client.publish(channel, json.dumps({"percent": percent, "phase": "memory", "updated": time.time()}))
        time.sleep(0.3)
    try:
        for status in (MigrationStatus.SWITCHING, MigrationStatus.COMPLETED):
            with transaction.atomic():
                transition(locked(migration), status, actor="test")
    finally:
        connection.close()


def test_the_migration_bar_moves_with_its_event_stream_in_chromium(
    live_server, fleet, launch_streams, settings
):
    browser = Client()
    browser.force_login(fleet)
    cookie = f"sessionid={browser.cookies['sessionid'].value}"
    page = _cookie_proxy(live_server.url, cookie)
    origin = f"http://127.0.0.1:{page.server_port}"
    streams = _cookie_proxy(launch_streams(STREAMS_ALLOWED_ORIGINS=origin), cookie, streaming=True)
    settings.STREAMS_URL = f"http://127.0.0.1:{streams.server_port}"
    migration = Migration.objects.get()
    publisher = threading.Thread(target=_publish_as_a_node_then_complete, args=(migration,))
    publisher.start()
    try:
        dom = _chromium("--dump-dom", f"{origin}/dashboard/")
        publisher.join(timeout=60)
        assert dom.returncode == 0, dom.stderr[-2000:]
        html = dom.stdout
        assert 'data-rendered="yes"' in html
        assert 'aria-valuenow="77.5"' in html and "77.5%" in html, html[html.find('id="migrations"') :][:1500]
        assert "completed" in html  # the stream's end
        assert 'id="stream-note" class="note" hidden' in html  # no fallback was needed
    finally:
        publisher.join(timeout=60)
        page.shutdown()
        streams.shutdown()


def test_without_its_stream_the_bar_says_so_and_follows_the_refresh(live_server, fleet, settings):
    browser = Client()
    browser.force_login(fleet)
    page = _cookie_proxy(live_server.url, f"sessionid={browser.cookies['sessionid'].value}")
    nothing = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    settings.STREAMS_URL = f"http://127.0.0.1:{nothing.server_port}"
    nothing.server_close()  # nothing listens there
    try:
        dom = _chromium("--dump-dom", f"http://127.0.0.1:{page.server_port}/dashboard/")
        assert dom.returncode == 0, dom.stderr[-2000:]
        assert "Live progress unavailable (the live stream could not be opened)" in dom.stdout
        assert 'role="progressbar"' in dom.stdout  # the bar is still there, from the page's data
    finally:
        page.shutdown()


def test_the_dashboard_wants_a_staff_login(client, make_user):
    assert client.get("/dashboard/").status_code == 302
    client.force_login(make_user("someone"))
    assert client.get("/dashboard/").status_code == 302
    assert client.get("/dashboard/data/").status_code == 302
