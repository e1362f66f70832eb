"""The watchdog and a stalled ``switching`` migration: only a known answer from the destination acts.

The decision is a pure function; the integration test stops a private ``redis-server`` (never the
machine's shared one) at the moment the watchdog asks, as a production Redis outage would.
"""

import json
import time
from datetime import UTC, datetime, timedelta

import pytest
import redis
from django.conf import settings
from django.utils import timezone

from apps.migrations import services
from apps.migrations.models import Migration
from apps.monitoring.models import Alert
from apps.monitoring.services import alerts_evaluate, control_metrics_sample
from apps.vms.models import VM
from tests.apps.migrations.test_migration_services import (
    _transferring,
    running_vm,  # noqa: F401 (fixture)
)
from tests.faults.redis_server import PrivateRedis, private_redis  # noqa: F401 (fixture)
from workers import contract

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
BOUND = timedelta(seconds=300)


@pytest.mark.parametrize(
    ("runs", "unknown_since", "decision"),
    [
        (True, None, "complete"),
        (True, NOW - 2 * BOUND, "complete"),
        (False, None, "roll_back"),
        (None, None, "wait"),
        (None, NOW - BOUND + timedelta(seconds=1), "wait"),
        (None, NOW - BOUND, "operator"),
        (None, NOW - 10 * BOUND, "operator"),
    ],
)
def test_only_a_known_answer_settles_a_switching_migration(runs, unknown_since, decision):
    assert (
        services.switching_decision(runs=runs, unknown_since=unknown_since, now=NOW, bound=BOUND) == decision
    )


def _switching(running_vm, user) -> Migration:  # noqa: F811
    migration = _transferring(running_vm, user)
    services.migration_report(
        migration_id=str(migration.pk), node="src", role="source", event="transferred", stats={}
    )
    # Stalled: no progress for longer than MIGRATION_STALL_TIMEOUT.
    Migration.objects.filter(pk=migration.pk).update(last_progress_at=timezone.now() - timedelta(hours=1))
    migration = Migration.objects.get(pk=migration.pk)
    assert migration.status == "switching"
    return migration


def _heartbeat(client: redis.Redis, node: str, vms: list[dict[str, str]]) -> None:
    client.set(contract.HEARTBEAT_KEY.format(name=node), json.dumps({"ts": time.time(), "vms": vms}), ex=60)


def test_a_fresh_heartbeat_decides_and_a_missing_one_waits(api, running_vm, user):  # noqa: F811
    client = redis.Redis.from_url(settings.REDIS_URL)
    client.delete(contract.HEARTBEAT_KEY.format(name="dst"))
    migration = _switching(running_vm, user)
    assert services.migrations_watchdog() == []
    waiting = Migration.objects.get(pk=migration.pk)
    assert waiting.status == "switching" and waiting.dest_unknown_since is not None
    assert any(
        "dst sends no heartbeat" in detail for detail in waiting.events.values_list("detail", flat=True)
    )
    _heartbeat(client, "dst", [{"id": str(running_vm.pk), "state": "running", "node_state": "paused"}])
    assert services.migrations_watchdog() == [str(migration.pk)]
    failed = Migration.objects.get(pk=migration.pk)
    assert failed.status == "failed" and "dst's heartbeat shows the VM paused" in failed.error
    assert VM.objects.get(pk=running_vm.pk).node.name == "src"


def test_redis_stopped_while_switching_waits_then_calls_an_operator(
    api,
    running_vm,  # noqa: F811
    user,
    private_redis: PrivateRedis,  # noqa: F811
    settings,
):
    settings.REDIS_URL = private_redis.url
    settings.NOVACRON = {**settings.NOVACRON, "MIGRATION_SWITCH_UNKNOWN_TIMEOUT": 60}
    migration = _switching(running_vm, user)
    private_redis.stop()
    for _ in range(2):  # asked again on the next tick: still unknown, still no rollback
        assert services.migrations_watchdog() == []
        waiting = Migration.objects.get(pk=migration.pk)
        assert (waiting.status, waiting.needs_operator) == ("switching", False)
    assert VM.objects.get(pk=running_vm.pk).state == "migrating"
    notes = [e.detail for e in waiting.events.all() if e.detail.startswith("cannot tell whether dst runs")]
    assert len(notes) == 1 and "Redis did not answer" in notes[0], notes
    # Past the bound with Redis still down: an operator decides, and the API and admin say why.
    assert waiting.dest_unknown_since is not None
    Migration.objects.filter(pk=migration.pk).update(dest_unknown_since=waiting.dest_unknown_since - BOUND)
    assert services.migrations_watchdog() == []
    flagged = Migration.objects.get(pk=migration.pk)
    assert (flagged.status, flagged.needs_operator) == ("switching", True)
    body = api.get(f"/api/v1/migrations/{migration.pk}/").json()
    assert body["needs_operator"] is True and "Redis did not answer" in body["attention"]
    assert "whether dst runs the VM is unknown" in body["attention"]
    assert any("needs an operator" in event["detail"] for event in body["history"])
    # Redis back: the alert fires from the control plane's samples while the answer is still unknown.
    private_redis.start()
    client = redis.Redis.from_url(private_redis.url)
    sampled_at = time.time()
    control_metrics_sample(client=client, now=sampled_at)
    alerts_evaluate(now=datetime.fromtimestamp(sampled_at, tz=UTC))
    alert = Alert.objects.get(rule__name="Migration waits for an operator")
    assert (alert.status, alert.severity) == ("firing", "critical")
    assert services.migrations_watchdog() == []  # no heartbeat yet: unknown still
    assert Migration.objects.get(pk=migration.pk).status == "switching"
    # The destination's heartbeat answers: the VM runs there, so the migration completes.
    _heartbeat(client, "dst", [{"id": str(running_vm.pk), "state": "running", "node_state": "running"}])
    assert services.migrations_watchdog() == []
    done = Migration.objects.get(pk=migration.pk)
    assert (done.status, done.needs_operator, done.attention) == ("completed", False, "")
    vm = VM.objects.get(pk=running_vm.pk)
    assert (vm.node.name, vm.state) == ("dst", "running")
    later = sampled_at + 61
    control_metrics_sample(client=client, now=later)
    alerts_evaluate(now=datetime.fromtimestamp(later, tz=UTC))
    assert Alert.objects.get(pk=alert.pk).status == "resolved"


def test_a_migration_whose_link_is_reconnecting_is_not_stalled_until_the_outage_limit(
    running_vm,  # noqa: F811
    user,
    settings,
):
    settings.NOVACRON = settings.NOVACRON | {"MIGRATION_LINK_OUTAGE_SECONDS": 120}
    migration = _transferring(running_vm, user)
    Migration.objects.filter(pk=migration.pk).update(last_progress_at=timezone.now() - timedelta(hours=1))
    client = redis.Redis.from_url(settings.REDIS_URL)
    key = contract.MIGRATION_PROGRESS_KEY.format(id=migration.pk)
    client.hset(key, mapping={"wire_bytes": 1000, "link": "reconnecting", "outage_seconds": 30})
    for _tick in range(2):  # the byte counts do not move (the second look knows), but the link is cut
        assert services.migrations_watchdog() == []
    kept = Migration.objects.get(pk=migration.pk)
    assert kept.status == "transferring"
    assert kept.last_progress_at is not None and kept.last_progress_at > timezone.now() - timedelta(minutes=1)

    Migration.objects.filter(pk=migration.pk).update(last_progress_at=timezone.now() - timedelta(hours=1))
    client.hset(key, mapping={"outage_seconds": 121})  # past the limit: a stall like any other
    assert services.migrations_watchdog() == [str(migration.pk)]
    assert Migration.objects.get(pk=migration.pk).status == "failed"
    client.delete(key)
