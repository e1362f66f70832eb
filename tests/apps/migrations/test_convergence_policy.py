"""The forecast in the API and the ``on_no_convergence`` policy on the control side (real PostgreSQL and
Redis; the source's forecast reports are applied as a node sends them)."""

import pytest
import redis
from django.conf import settings
from django.core.exceptions import ValidationError

from apps.migrations import services
from apps.migrations.choices import MigrationMode, OnNoConvergence
from apps.migrations.models import Migration
from apps.vms.models import Node
from tests.apps.migrations.test_migration_services import _transferring, running_vm  # noqa: F401 (fixture)
from tests.apps.streams.conftest import publish_progress
from workers import contract

pytestmark = pytest.mark.django_db(transaction=True)

REASON = "dirty rate 12.0 MiB/s, effective rate 3.0 MiB/s (link 2.2 MiB/s x compression 1.39): too fast"


def _verdict(migration: Migration, verdict: contract.Converging, passes: int) -> None:
    services.migration_report(
        migration_id=str(migration.pk),
        node="src",
        role="source",
        event="forecast",
        detail=REASON,
        stats={"converging": verdict, "converging_reason": REASON, "memory_passes": passes},
    )


def _memory_phase(migration: Migration) -> None:
    services.migration_report(
        migration_id=str(migration.pk), node="src", role="source", event="phase", detail="memory"
    )


def _history(migration: Migration) -> list[tuple[str, str]]:
    return list(migration.events.order_by("at", "id").values_list("actor", "detail"))


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"on_no_convergence": "give-up"}, "on_no_convergence"),
        ({"on_no_convergence": "force_complete_after"}, "force_complete_after_passes"),
        (
            {"on_no_convergence": "force_complete_after", "force_complete_after_passes": 0},
            "force_complete_after_passes",
        ),
        ({"on_no_convergence": "cancel", "force_complete_after_passes": 3}, "force_complete_after_passes"),
        ({"force_complete_after_passes": "many"}, "force_complete_after_passes"),
    ],
)
def test_a_bad_policy_is_a_400_naming_the_field_and_records_nothing(api, running_vm, body, field):  # noqa: F811
    response = api.post(f"/api/v1/vms/{running_vm.pk}/migrate/", {"dest_node": "dst", **body}, format="json")
    assert response.status_code == 400, response.json()
    assert field in response.json()["error"]["fields"], response.json()
    assert not Migration.objects.exists()


def test_the_policy_defaults_to_the_setting_and_shows_on_the_migration(api, running_vm, settings):  # noqa: F811
    settings.NOVACRON = {**settings.NOVACRON, "MIGRATION_ON_NO_CONVERGENCE": "force_complete_after:4"}
    body = api.post(f"/api/v1/vms/{running_vm.pk}/migrate/", {"dest_node": "dst"}, format="json").json()
    assert (body["on_no_convergence"], body["force_complete_after_passes"]) == ("force_complete_after", 4)
    assert (body["converging"], body["converging_reason"], body["eta_seconds"]) == ("unknown", "", None)


def test_forecast_fields_in_get_while_running_and_the_verdict_after_the_end(api, running_vm, user):  # noqa: F811
    migration = _transferring(running_vm, user)
    publish_progress(
        migration, phase="memory", percent=60.0, eta_seconds=12.5, converging="yes", converging_reason=REASON
    )
    body = api.get(f"/api/v1/migrations/{migration.pk}/").json()
    assert (body["eta_seconds"], body["converging"], body["converging_reason"]) == (12.5, "yes", REASON)
    publish_progress(migration, eta_seconds="", converging="no")  # unknown: "" in the hash
    body = api.get(f"/api/v1/migrations/{migration.pk}/").json()
    assert (body["eta_seconds"], body["converging"]) == (None, "no")
    _verdict(migration, "no", 2)  # the report also keeps the verdict in the row's stats
    services.migration_cancel(migration=migration, actor="alice")
    services.migration_report(migration_id=str(migration.pk), node="src", role="source", event="cancelled")
    body = api.get(f"/api/v1/migrations/{migration.pk}/").json()
    assert body["status"] == "cancelled"
    assert (body["eta_seconds"], body["converging"], body["converging_reason"]) == (None, "no", REASON)


def test_cancel_policy_cancels_on_no_with_the_reason_in_the_history(api, running_vm, user):  # noqa: F811
    response = api.post(
        f"/api/v1/vms/{running_vm.pk}/migrate/",
        {"dest_node": "dst", "on_no_convergence": "cancel"},
        format="json",
    )
    assert response.status_code == 202, response.json()
    migration = Migration.objects.get(pk=response.json()["id"])
    services.migrations_schedule()
    targets = {"disk": f"{running_vm.pk}/nbd.sock", "memory": f"{running_vm.pk}/incoming.sock"}
    services.migration_report(
        migration_id=str(migration.pk), node="dst", role="dest", event="prepared", targets=targets
    )
    _memory_phase(migration)
    _verdict(migration, "no", 2)
    _verdict(migration, "no", 3)  # a later pass: cancelled once
    migration = Migration.objects.get(pk=migration.pk)
    assert migration.cancel_requested
    control = redis.Redis.from_url(settings.REDIS_URL).hgetall(f"novacron:migration:{migration.pk}:control")
    assert control[b"cancel"] == b"1"
    history = _history(migration)
    assert ("node src", f"converging no (RAM pass 2): {REASON}") in history
    policy = [detail for actor, detail in history if actor == "policy on_no_convergence"]
    assert policy == [f"on_no_convergence cancel: cancelling ({REASON})", "cancel requested"], history


def test_force_complete_after_n_passes_forces_at_pass_n_once(running_vm, user):  # noqa: F811
    migration = services.migration_request(
        vm=running_vm,
        requested_by=user,
        mode=MigrationMode.LIVE,
        dest_node=Node.objects.get(name="dst"),
        on_no_convergence=OnNoConvergence.FORCE_COMPLETE_AFTER,
        force_complete_after_passes=3,
    )
    services.migrations_schedule()
    targets = {"disk": f"{running_vm.pk}/nbd.sock", "memory": f"{running_vm.pk}/incoming.sock"}
    services.migration_report(
        migration_id=str(migration.pk), node="dst", role="dest", event="prepared", targets=targets
    )
    _memory_phase(migration)
    control_key = f"novacron:migration:{migration.pk}:control"
    client = redis.Redis.from_url(settings.REDIS_URL)
    _verdict(migration, "no", 2)
    assert client.hget(control_key, "force_complete") is None
    _verdict(migration, "no", 3)
    _verdict(migration, "no", 4)
    assert client.hget(control_key, "force_complete") == b"1"
    policy = [detail for actor, detail in _history(migration) if actor == "policy on_no_convergence"]
    assert policy == [
        "on_no_convergence force_complete_after 3: waiting for pass 3",
        f"on_no_convergence force_complete_after 3: forcing at pass 3 ({REASON})",
        "force-complete requested",
    ], policy


def test_keep_policy_records_the_verdicts_and_leaves_the_migration_running(running_vm, user):  # noqa: F811
    migration = _transferring(running_vm, user)
    assert migration.on_no_convergence == "keep"
    _memory_phase(migration)
    _verdict(migration, "no", 2)
    _verdict(migration, "no", 3)
    _verdict(migration, "yes", 4)
    migration = Migration.objects.get(pk=migration.pk)
    assert migration.status == "transferring" and not migration.cancel_requested
    details = [detail for _, detail in _history(migration) if "converg" in detail]
    assert details == [
        f"converging no (RAM pass 2): {REASON}",
        "on_no_convergence keep: auto-converge throttles the guest; trying on",
        f"converging yes (RAM pass 4): {REASON}",
    ], details


def test_the_row_refuses_force_complete_after_without_its_passes(running_vm, user):  # noqa: F811
    migration = _transferring(running_vm, user)
    migration.on_no_convergence = OnNoConvergence.FORCE_COMPLETE_AFTER
    with pytest.raises(ValidationError) as raised:
        migration.clean()
    assert "force_complete_after_passes" in raised.value.message_dict
    migration.force_complete_after_passes = 2
    migration.clean()
