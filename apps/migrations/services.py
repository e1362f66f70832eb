"""Migrations: requests, the state machine, scheduling within per-node limits, node reports, control.

States: queued -> preparing -> transferring (phases disk, memory) -> switching -> completed, or
failed / cancelled, both rolled back (the VM stays on its source, the destination's reservation is
released and its half-made copy removed). Every transition is recorded as a MigrationEvent. The
work itself is a sequence of node tasks (prepare on the destination, send on the source, finish on
the destination, cleanup on the source) chained through the reports each node sends back.
"""

import json
import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

import redis
from django.conf import settings
from django.contrib.auth.models import User
from django.core.cache import cache
from django.db import IntegrityError, transaction
from django.db.models import Count, Q
from django.utils import timezone

from apps.core.conf import novacron_setting
from apps.core.errors import Conflict, InvalidInput, InvalidState, NoCapacity
from apps.vms import cache as vm_cache
from apps.vms import dispatch, scheduler
from apps.vms.choices import NodeStatus, VMState
from apps.vms.models import VM, Node
from workers import contract
from workers.dwcp import sign_ticket

from . import progress
from .choices import ACTIVE_STATUSES, MigrationMode, MigrationPhase, MigrationStatus
from .models import Migration, MigrationEvent

logger = logging.getLogger(__name__)

S = MigrationStatus
TRANSITIONS: dict[MigrationStatus, frozenset[MigrationStatus]] = {
    S.QUEUED: frozenset({S.PREPARING, S.CANCELLED, S.FAILED}),
    S.PREPARING: frozenset({S.TRANSFERRING, S.CANCELLED, S.FAILED}),
    S.TRANSFERRING: frozenset({S.SWITCHING, S.CANCELLED, S.FAILED}),
    S.SWITCHING: frozenset({S.COMPLETED, S.FAILED}),
    S.COMPLETED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
}
RUNNING_STATUSES = frozenset({S.PREPARING, S.TRANSFERRING, S.SWITCHING})
TERMINAL_STATUSES = frozenset({S.COMPLETED, S.FAILED, S.CANCELLED})

_MIGRATABLE = {
    MigrationMode.LIVE: frozenset({VMState.RUNNING}),
    MigrationMode.COLD: frozenset({VMState.RUNNING, VMState.STOPPED}),
}


def _demand(vm: VM) -> scheduler.Demand:
    return scheduler.Demand(vm.vcpus, vm.memory_mb, vm.disk_gb)


def _transition(
    migration: Migration, to: MigrationStatus, *, actor: str, detail: str = "", phase: str | None = None
) -> None:
    """Move a locked migration to ``to`` (checked against the table) and record the event."""
    current = MigrationStatus(migration.status)
    if to not in TRANSITIONS[current]:
        raise InvalidState(f"Migration {migration.pk} cannot go from {current} to {to}.")
    now = timezone.now()
    migration.status = to
    if phase is not None:
        migration.phase = phase
    if to == S.PREPARING:
        migration.started_at = now
    if to in RUNNING_STATUSES:
        migration.last_progress_at = now
    if to in TERMINAL_STATUSES:
        migration.finished_at = now
        migration.phase = MigrationPhase.NONE
    migration.save()
    event = MigrationEvent.objects.create(
        migration=migration,
        actor=actor[:150],
        from_status=current,
        to_status=to,
        phase=migration.phase,
        detail=detail,
    )
    if to in TERMINAL_STATUSES:
        _forget_progress(migration)
    if novacron_setting("MIGRATION_WEBHOOK_URL"):
        from .tasks import migration_webhook_send  # noqa: PLC0415  (tasks import services)

        event_id = event.pk
        transaction.on_commit(lambda: migration_webhook_send.delay(event_id=event_id))


def _forget_progress(migration: Migration) -> None:
    """After commit: the ended migration's Redis keys expire (its figures are in the row)."""
    migration_id = str(migration.pk)

    def forget() -> None:
        try:
            progress.forget(_redis(), migration_id)
        except redis.RedisError as exc:  # they expire by their own TTL in any case
            logger.warning("migration %s: progress keys not dropped: %s", migration_id, exc)

    transaction.on_commit(forget)


def _record_phase(migration: Migration, phase: str, *, actor: str) -> None:
    if phase == migration.phase or phase not in MigrationPhase.values:
        return
    migration.phase = phase
    migration.save(update_fields=["phase"])
    MigrationEvent.objects.create(
        migration=migration,
        actor=actor,
        from_status=migration.status,
        to_status=migration.status,
        phase=phase,
        detail=f"phase {phase}",
    )


def _redis() -> redis.Redis:
    return redis.Redis.from_url(settings.REDIS_URL, socket_timeout=5)


# --- Requests ---------------------------------------------------------------------------------------


@transaction.atomic
def migration_request(
    *,
    vm: VM,
    requested_by: User,
    mode: MigrationMode,
    dest_node: Node | None = None,
    bandwidth_limit_mbps: int | None = None,
) -> Migration:
    """Record a migration of ``vm`` as ``queued`` with the destination's capacity reserved."""
    vm = VM.objects.select_for_update(of=("self",)).select_related("node").get(pk=vm.pk)
    if vm.state == VMState.MIGRATING:
        raise Conflict(f"VM {vm.name} is already being migrated.")
    if vm.state not in _MIGRATABLE[mode]:
        raise InvalidState(f"Cannot {mode}-migrate VM {vm.name}: it is {vm.state}.")
    if vm.pending_action:
        raise InvalidState(f"Cannot migrate VM {vm.name}: a {vm.pending_action} is still in progress.")
    source = vm.node
    if source is None:
        raise InvalidState(f"Cannot migrate VM {vm.name}: it is on no node.")
    if dest_node is not None and dest_node.pk == source.pk:
        raise InvalidInput(
            "The destination is the VM's current node.", fields={"dest_node": ["Pick another node."]}
        )
    if dest_node is not None and dest_node.status != NodeStatus.UP:
        raise InvalidState(f"Node {dest_node.name} is {dest_node.status}: it takes no migrations.")
    (dest,) = scheduler.reserve(demands=[_demand(vm)], pinned=[dest_node], exclude={source.pk})
    assert dest is not None
    try:
        with transaction.atomic():
            migration = Migration.objects.create(
                vm=vm,
                source_node=source,
                dest_node=dest,
                mode=mode,
                requested_by=requested_by,
                bandwidth_limit_mbps=bandwidth_limit_mbps,
                vm_state_before=vm.state,
            )
    except IntegrityError as exc:
        raise Conflict(f"VM {vm.name} is already being migrated.") from exc
    MigrationEvent.objects.create(
        migration=migration,
        actor=requested_by.get_username(),
        to_status=S.QUEUED,
        detail=f"{mode} migration from {source.name} to {dest.name} requested",
    )
    vm.state = VMState.MIGRATING
    vm.save(update_fields=["state", "updated_at"])
    vm_cache.vms_changed([vm])
    transaction.on_commit(_schedule_soon)
    return migration


def _schedule_soon() -> None:
    from .tasks import migrations_schedule  # noqa: PLC0415 - tasks import services

    migrations_schedule.delay()


# --- Scheduling -------------------------------------------------------------------------------------


def migrations_schedule() -> list[str]:
    """Start queued migrations, oldest first, while their nodes are under the concurrency limits."""
    started: list[str] = []
    max_out = novacron_setting("MIGRATION_MAX_OUTGOING")
    max_in = novacron_setting("MIGRATION_MAX_INCOMING")
    with transaction.atomic():
        # One scheduler at a time: lock the queued rows; a concurrent call waits, then sees them started.
        queued = list(
            Migration.objects.select_for_update(of=("self",))
            .filter(status=S.QUEUED)
            .select_related("vm", "vm__image", "vm__node", "source_node", "dest_node")
            .order_by("created_at")
        )
        if not queued:
            return started
        running = Migration.objects.filter(status__in=RUNNING_STATUSES)
        outgoing = dict(
            running.values_list("source_node").annotate(n=Count("id")).values_list("source_node", "n")
        )
        incoming = dict(
            running.values_list("dest_node").annotate(n=Count("id")).values_list("dest_node", "n")
        )
        for migration in queued:
            if (
                outgoing.get(migration.source_node_id, 0) >= max_out
                or incoming.get(migration.dest_node_id, 0) >= max_in
            ):
                continue
            outgoing[migration.source_node_id] = outgoing.get(migration.source_node_id, 0) + 1
            incoming[migration.dest_node_id] = incoming.get(migration.dest_node_id, 0) + 1
            _transition(
                migration,
                S.PREPARING,
                actor="system",
                detail=f"started; preparing {migration.dest_node.name}",
            )
            _send(
                migration,
                migration.dest_node,
                contract.NODE_MIGRATION_PREPARE,
                mode=migration.mode,
                source_node=migration.source_node.name,
            )
            started.append(str(migration.pk))
    return started


def _send(migration: Migration, node: Node, task: str, **kwargs: Any) -> None:
    """Send a migration task to ``node`` after commit."""
    payload = {"migration_id": str(migration.pk), "vm": dispatch.vm_spec(migration.vm), **kwargs}
    signature = dispatch.app.signature(task, kwargs=payload, queue=contract.node_queue(node.name))
    transaction.on_commit(signature.apply_async)


def _options(migration: Migration) -> dict[str, Any]:
    return {
        "bandwidth_limit_mbps": migration.bandwidth_limit_mbps,
        "downtime_limit_ms": novacron_setting("MIGRATION_DOWNTIME_LIMIT_MS"),
        "auto_converge": True,
        "streams": novacron_setting("MIGRATION_STREAMS"),
    }


def _tickets(migration: Migration, targets: dict[str, str]) -> dict[str, str]:
    secret = settings.DWCP_SECRET
    if not secret:
        raise InvalidState("DWCP_SECRET is not set on the control plane: no transfer can be authorised.")
    kind: Literal["file", "tunnel"] = "tunnel" if migration.mode == MigrationMode.LIVE else "file"
    return {
        name: sign_ticket(
            secret=secret,
            source_node=migration.source_node.name,
            dest_node=migration.dest_node.name,
            kind=kind,
            target=target,
            transfer_id=f"{migration.pk}-{name}",
            ttl_seconds=novacron_setting("MIGRATION_TICKET_TTL"),
        )
        for name, target in targets.items()
    }


# --- Reports from nodes -----------------------------------------------------------------------------


@transaction.atomic
def migration_report(
    *,
    migration_id: str,
    node: str,
    role: str,
    event: str,
    detail: str = "",
    stats: dict[str, Any] | None = None,
    targets: dict[str, str] | None = None,
    cause: contract.FailureCause = "error",
) -> None:
    """Apply a node's report. Idempotent: a report that no longer fits the state is logged and dropped.

    A failure is reported by both sides in either order: the first rolls back, a later one is recorded
    in the history and becomes the error when its cause ranks higher (``contract.FAILURE_CAUSES``).
    """
    migration = (
        Migration.objects.select_for_update(of=("self",))
        .select_related("vm", "vm__image", "vm__node", "source_node", "dest_node")
        .filter(pk=migration_id)
        .first()
    )
    if migration is None:
        logger.warning("report %s for unknown migration %s from %s ignored", event, migration_id, node)
        return
    expected = migration.source_node if role == "source" else migration.dest_node
    if expected.name != node:
        logger.warning(
            "migration %s: %s report from %s, expected %s; ignored", migration_id, role, node, expected
        )
        return
    actor = f"node {node}"
    if stats:
        merged = {**migration.stats, **stats}
        stopped, resumed = merged.get("source_stopped_at"), merged.get("dest_resumed_at")
        if isinstance(stopped, (int, float)) and isinstance(resumed, (int, float)):
            # What the guest lived through: source CPUs stopped -> destination CPUs resumed (QMP event times).
            merged["guest_pause_ms"] = round((resumed - stopped) * 1000, 1)
        migration.stats = merged
        migration.save(update_fields=["stats"])
    status = MigrationStatus(migration.status)
    if event in ("aborted", "cleaned", "kept"):
        _note(migration, f"{role} {event}: {detail}", actor=actor)
        return
    if event == "failed" and status in TERMINAL_STATUSES:
        _late_failure(migration, actor=actor, detail=f"{role} {node}: {detail}", cause=cause)
        return
    if status in TERMINAL_STATUSES:
        logger.info("migration %s is %s; late %s report from %s ignored", migration_id, status, event, node)
        if role == "source":  # the source's last word comes after its last progress write
            _forget_progress(migration)
        return
    if event == "phase":
        _record_phase(migration, detail, actor=actor)
    elif event == "prepared" and status == S.PREPARING:
        _on_prepared(migration, targets or {}, actor)
    elif event == "transferred" and status == S.TRANSFERRING:
        _transition(migration, S.SWITCHING, actor=actor, detail=detail or "transfer complete")
        if migration.mode == MigrationMode.COLD:
            start = migration.vm_state_before == VMState.RUNNING
            _send(migration, migration.dest_node, contract.NODE_MIGRATION_FINISH, start=start)
    elif event == "switched" and status in (S.TRANSFERRING, S.SWITCHING):
        if status == S.TRANSFERRING:
            _transition(migration, S.SWITCHING, actor=actor, detail="destination took over")
        _complete(migration, actor, detail)
    elif event == "cancelled":
        _roll_back(migration, S.CANCELLED, actor=actor, detail=detail or "cancelled")
    elif event == "failed" and migration.cancel_requested:
        # Cancelling breaks the transfer, and the side that notices first reports a failure: it is
        # still the cancel the operator asked for.
        _roll_back(migration, S.CANCELLED, actor=actor, detail=f"cancelled ({role} {node}: {detail})")
    elif event == "failed":
        _roll_back(migration, S.FAILED, actor=actor, detail=f"{role} {node}: {detail}", cause=cause)
    else:
        logger.info(
            "migration %s (%s): %s report from %s does not apply; ignored", migration_id, status, event, node
        )


def _on_prepared(migration: Migration, targets: dict[str, str], actor: str) -> None:
    if migration.cancel_requested:
        _roll_back(migration, S.CANCELLED, actor="system", detail="cancelled while preparing")
        return
    try:
        tickets = _tickets(migration, targets)
    except InvalidState as exc:
        _roll_back(migration, S.FAILED, actor="system", detail=exc.message)
        return
    _transition(migration, S.TRANSFERRING, actor=actor, detail="destination ready", phase=MigrationPhase.DISK)
    progress.set_control(_redis(), str(migration.pk), bandwidth_limit_mbps=migration.bandwidth_limit_mbps)
    _send(
        migration,
        migration.source_node,
        contract.NODE_MIGRATION_SEND,
        mode=migration.mode,
        dest_node=migration.dest_node.name,
        dest_dwcp_address=migration.dest_node.dwcp_address,
        tickets=tickets,
        targets=targets,
        options=_options(migration),
    )


def _complete(migration: Migration, actor: str, detail: str) -> None:
    vm = VM.objects.select_for_update(of=("self",)).get(pk=migration.vm_id)
    source = migration.source_node
    scheduler.release(node_id=source.pk, demand=_demand(vm))
    vm.node = migration.dest_node
    started = migration.mode == MigrationMode.LIVE or migration.vm_state_before == VMState.RUNNING
    vm.state = VMState.RUNNING if started else VMState.STOPPED
    vm.state_reason = ""
    vm.save(update_fields=["node", "state", "state_reason", "updated_at"])
    vm_cache.vms_changed([vm])
    final = progress.read(_redis(), str(migration.pk))
    migration.stats = {**migration.stats, **{key: value for key, value in final.items() if key != "updated"}}
    if migration.started_at:
        migration.stats["total_seconds"] = round((timezone.now() - migration.started_at).total_seconds(), 3)
    migration.percent = 100.0
    _transition(migration, S.COMPLETED, actor=actor, detail=detail or f"now on {migration.dest_node.name}")
    _send(migration, source, contract.NODE_MIGRATION_CLEANUP)
    node_drain_progress(node_id=source.pk)
    transaction.on_commit(_schedule_soon)


def _roll_back(
    migration: Migration,
    to: MigrationStatus,
    *,
    actor: str,
    detail: str,
    cause: contract.FailureCause = "error",
) -> None:
    """Fail or cancel: the VM stays where it was, the destination is released and cleaned."""
    was = MigrationStatus(migration.status)
    _transition(migration, to, actor=actor, detail=detail)
    migration.error = detail if to == S.FAILED else ""
    migration.error_cause = cause if to == S.FAILED else ""
    migration.save(update_fields=["error", "error_cause"])
    vm = VM.objects.select_for_update(of=("self",)).get(pk=migration.vm_id)
    scheduler.release(node_id=migration.dest_node_id, demand=_demand(vm))
    if vm.state == VMState.MIGRATING:
        vm.state = migration.vm_state_before or VMState.RUNNING
        vm.state_reason = f"Migration {to}: {detail}"[:1000] if to == S.FAILED else ""
        vm.save(update_fields=["state", "state_reason", "updated_at"])
        vm_cache.vms_changed([vm])
    if was != S.QUEUED:
        progress.set_control(_redis(), str(migration.pk), cancel=True)
        _send(migration, migration.dest_node, contract.NODE_MIGRATION_ABORT, role="dest")
        _send(
            migration,
            migration.source_node,
            contract.NODE_MIGRATION_ABORT,
            role="source",
            restart=migration.vm_state_before == VMState.RUNNING,
        )
    transaction.on_commit(_schedule_soon)


def _late_failure(migration: Migration, *, actor: str, detail: str, cause: contract.FailureCause) -> None:
    """A failure reported after the migration ended: kept in the history; the error when it says more.

    The other side's report of the same failure can arrive first (the source resuming on the
    destination's memory-check verdict, sent before the destination's own report with the count of
    differing MiB): what an operator reads must not depend on that order.
    """
    _note(migration, f"failed ({cause}): {detail}", actor=actor)
    if migration.status != S.FAILED or not _outranks(cause, migration.error_cause):
        return
    previous = f"Migration {S.FAILED}: {migration.error}"[:1000]
    migration.error, migration.error_cause = detail, cause
    migration.save(update_fields=["error", "error_cause"])
    VM.objects.filter(pk=migration.vm_id, state_reason=previous).update(
        state_reason=f"Migration {S.FAILED}: {detail}"[:1000]
    )


def _outranks(cause: str, current: str) -> bool:
    """Whether a failure of ``cause`` says more than the recorded one (an unranked cause ranks lowest)."""
    ranks: dict[str, int] = {name: rank for rank, name in enumerate(contract.FAILURE_CAUSES)}
    return ranks.get(cause, -1) > ranks.get(current, -1)


# --- Control while it runs --------------------------------------------------------------------------


def _locked(migration: Migration) -> Migration:
    return (
        Migration.objects.select_for_update(of=("self",))
        .select_related("vm", "vm__image", "source_node", "dest_node")
        .get(pk=migration.pk)
    )


@transaction.atomic
def migration_cancel(*, migration: Migration, actor: str) -> Migration:
    """Cancel in any phase before the switch; queued and preparing ones stop at once."""
    migration = _locked(migration)
    status = MigrationStatus(migration.status)
    if status in TERMINAL_STATUSES or status == S.SWITCHING:
        raise InvalidState(f"Migration {migration.pk} is {status}: too late to cancel.")
    migration.cancel_requested = True
    migration.save(update_fields=["cancel_requested"])
    if status in (S.QUEUED, S.PREPARING):
        _roll_back(migration, S.CANCELLED, actor=actor, detail=f"cancelled by {actor} while {status}")
    else:
        # The source stops its transfer within a poll interval and reports "cancelled".
        progress.set_control(_redis(), str(migration.pk), cancel=True)
        MigrationEvent.objects.create(
            migration=migration, actor=actor, from_status=status, to_status=status, detail="cancel requested"
        )
    return migration


@transaction.atomic
def migration_set_bandwidth(
    *, migration: Migration, bandwidth_limit_mbps: int | None, actor: str
) -> Migration:
    migration = _locked(migration)
    if migration.status in TERMINAL_STATUSES:
        raise InvalidState(f"Migration {migration.pk} is {migration.status}.")
    migration.bandwidth_limit_mbps = bandwidth_limit_mbps
    migration.save(update_fields=["bandwidth_limit_mbps"])
    progress.set_control(_redis(), str(migration.pk), bandwidth_limit_mbps=bandwidth_limit_mbps)
    MigrationEvent.objects.create(
        migration=migration,
        actor=actor,
        from_status=migration.status,
        to_status=migration.status,
        detail=f"bandwidth limit {bandwidth_limit_mbps or 'lifted'}"
        + (" Mbit/s" if bandwidth_limit_mbps else ""),
    )
    return migration


@transaction.atomic
def migration_force_complete(*, migration: Migration, actor: str) -> Migration:
    """Ask the source to pause the guest and copy what is left (for guests that dirty memory too fast).

    Only in the memory phase. The source also lifts the bandwidth limit for that last copy: the guest
    is down until it arrives.
    """
    migration = _locked(migration)
    if migration.status != S.TRANSFERRING or migration.mode != MigrationMode.LIVE:
        raise InvalidState("Only a live migration that is transferring can be forced to complete.")
    if migration.phase != MigrationPhase.MEMORY:
        # Pausing now would make the whole memory copy downtime: convergence is a memory matter.
        raise InvalidState("Force-complete applies to the memory phase; the disk is still being mirrored.")
    progress.set_control(_redis(), str(migration.pk), force_complete=True)
    MigrationEvent.objects.create(
        migration=migration,
        actor=actor,
        from_status=migration.status,
        to_status=migration.status,
        detail="force-complete requested",
    )
    return migration


def migrations_watchdog() -> list[str]:
    """Fail running migrations whose progress has not moved for ``MIGRATION_STALL_TIMEOUT`` seconds.

    A stalled ``switching`` migration is settled by the destination's heartbeat instead (see
    ``switching_decision``): never rolled back on an unknown answer. Returns the ids it failed.
    """
    timeout = timedelta(seconds=novacron_setting("MIGRATION_STALL_TIMEOUT"))
    client = _redis()
    failed = []
    now = timezone.now()
    for migration in Migration.objects.filter(status__in=RUNNING_STATUSES):
        try:
            moved: bool | None = progress.note_movement(client, str(migration.pk))
        except redis.RedisError as exc:
            moved = None  # the progress is unreadable, not still: only the switch is looked at now
            logger.warning("watchdog: progress of migration %s unreadable: %s", migration.pk, exc)
        if moved:
            Migration.objects.filter(pk=migration.pk).update(last_progress_at=now)
            continue
        if (migration.last_progress_at or migration.created_at) >= now - timeout:
            continue
        try:
            with transaction.atomic():
                locked = _locked(migration)
                if locked.status == S.SWITCHING:
                    if _settle_switching(client, locked, now=now) == "roll_back":
                        failed.append(str(migration.pk))
                elif locked.status in RUNNING_STATUSES and moved is not None:
                    _roll_back(
                        locked,
                        S.FAILED,
                        actor="watchdog",
                        detail=f"no progress for {int(timeout.total_seconds())} s",
                    )
                    failed.append(str(migration.pk))
        except redis.RedisError as exc:  # Redis went away mid-way: nothing was written; next tick again
            logger.warning("watchdog: migration %s left for the next tick: %s", migration.pk, exc)
    return failed


SwitchDecision = Literal["complete", "roll_back", "wait", "operator"]


@dataclass(frozen=True)
class DestinationReading:
    """What the destination's heartbeat says of the migrating VM (``runs`` None: nothing can be told)."""

    runs: bool | None
    evidence: str


def switching_decision(
    *, runs: bool | None, unknown_since: datetime | None, now: datetime, bound: timedelta
) -> SwitchDecision:
    """What the watchdog does with a stalled ``switching`` migration, given the destination's answer.

    Past the switch the source QEMU may have handed its guest over: rolling back would then leave the
    guest running on a node the records do not name (seen in the soak test when a 'switched' report
    never arrived). So the destination decides, and only a known answer acts: running -> complete,
    not running -> roll back. An unknown answer (Redis unreachable, no heartbeat) waits and is asked
    again on every tick; unknown for ``bound`` since ``unknown_since``, the migration goes to an
    operator (and stays ``switching``: a known answer later still settles it).
    """
    if runs is True:
        return "complete"
    if runs is False:
        return "roll_back"
    if unknown_since is not None and now - unknown_since >= bound:
        return "operator"
    return "wait"


def _settle_switching(client: redis.Redis, migration: Migration, *, now: datetime) -> SwitchDecision:
    """Apply ``switching_decision`` to a locked, stalled ``switching`` migration."""
    reading = _destination_reading(client, migration)
    bound = timedelta(seconds=novacron_setting("MIGRATION_SWITCH_UNKNOWN_TIMEOUT"))
    decision = switching_decision(
        runs=reading.runs, unknown_since=migration.dest_unknown_since, now=now, bound=bound
    )
    dest = migration.dest_node.name
    if decision in ("complete", "roll_back"):
        migration.dest_unknown_since, migration.needs_operator, migration.attention = None, False, ""
        migration.save(update_fields=["dest_unknown_since", "needs_operator", "attention"])
        if decision == "complete":
            detail = f"{dest} runs the VM (no switch report came): {reading.evidence}"
            _complete(migration, "watchdog", detail)
        else:
            _roll_back(
                migration, S.FAILED, actor="watchdog", detail=f"stalled while switching; {reading.evidence}"
            )
        return decision
    if migration.dest_unknown_since is None:
        migration.dest_unknown_since = now
        migration.save(update_fields=["dest_unknown_since"])
        _note(
            migration,
            f"cannot tell whether {dest} runs the VM ({reading.evidence}); not rolling back: asking again "
            f"every tick, for an operator after {int(bound.total_seconds())} s",
        )
    elif decision == "operator" and not migration.needs_operator:
        since = migration.dest_unknown_since
        migration.needs_operator = True
        migration.attention = (
            f"Switching from {migration.source_node.name} to {dest} stalled "
            f"(last progress {_iso(migration.last_progress_at)}) and whether {dest} runs the VM is unknown "
            f"since {_iso(since)}: {reading.evidence}. The source may have handed the guest over, so the "
            f"migration is not rolled back. Check on {dest} whether VM {migration.vm_id} runs (its QEMU's "
            f"query-status) and on {migration.source_node.name} whether its copy is paused (postmigrate); "
            "the watchdog still settles it as soon as the destination's heartbeat answers."
        )[:2000]
        migration.save(update_fields=["needs_operator", "attention"])
        _note(migration, f"needs an operator: {reading.evidence} for {int((now - since).total_seconds())} s")
        logger.error("migration %s needs an operator: %s", migration.pk, migration.attention)
    return decision


def _note(migration: Migration, detail: str, *, actor: str = "watchdog") -> None:
    """Record an event that changes no status (the history an operator reads)."""
    MigrationEvent.objects.create(
        migration=migration,
        actor=actor,
        from_status=migration.status,
        to_status=migration.status,
        phase=migration.phase,
        detail=detail,
    )


def _iso(moment: datetime | None) -> str:
    return moment.isoformat(timespec="seconds") if moment else "never"


def _destination_reading(client: redis.Redis, migration: Migration) -> DestinationReading:
    """Read the destination's latest heartbeat for the migrating VM's guest (running, not paused)."""
    dest = migration.dest_node.name
    try:
        raw = client.get(contract.HEARTBEAT_KEY.format(name=dest))
    except redis.RedisError as exc:
        return DestinationReading(None, f"Redis did not answer for {dest}'s heartbeat: {exc}")
    if raw is None:
        # The key has a TTL: its node worker stopped reporting, but its QEMUs outlive it.
        return DestinationReading(None, f"{dest} sends no heartbeat")
    try:
        beat = json.loads(raw)
    except ValueError:
        beat = None
    if not isinstance(beat, dict) or not isinstance(beat.get("vms"), list):
        return DestinationReading(None, f"{dest}'s heartbeat is unreadable")
    entry = next(
        (e for e in beat["vms"] if isinstance(e, dict) and e.get("id") == str(migration.vm_id)), None
    )
    if entry is None:
        return DestinationReading(False, f"{dest}'s heartbeat does not list the VM")
    state = entry.get("node_state")
    return DestinationReading(state == "running", f"{dest}'s heartbeat shows the VM {state}")


# --- Leftover copies -------------------------------------------------------------------------------

# A migration's last message to a node can be lost (Redis restarted with it in flight, a worker killed
# between taking and running it): the source's cleanup after a completed migration, or the destination's
# abort after a failed or cancelled one. That node's copy then lingers and two nodes hold the VM (seen
# by the fault test 'Redis restarted during a live migration'). Every heartbeat lists what its node
# holds; a copy the records place elsewhere, still listed this long after its migration ended, gets its
# message again. Long enough for the normal message to arrive and run first; a copy sent twice changes
# nothing (both tasks remove only the copy whose migration marker names that migration and role).
MIGRATION_LEFTOVER_GRACE_SECONDS = 30
# After this many re-sends a copy that stays is no longer a lost message: it is left to an operator
# (the migration's history shows every attempt), rather than re-sent every grace period for ever.
MIGRATION_LEFTOVER_MAX_RESENDS = 3
_RECONCILER = "reconciler"


@transaction.atomic
def node_clean_migration_leftovers(*, node: Node, vm_ids: Iterable[str], seen: datetime) -> list[str]:
    """Send again the cleanup of copies ``node`` still held at ``seen`` that the records place elsewhere.

    For each such VM with no migration involving ``node`` in flight, the last migration involving the
    node that started decides: completed from it -> the source cleanup; failed or cancelled to it -> the
    destination's abort. A VM recorded on ``node`` is never touched here. Returns the migration ids.
    """
    ids = _valid_uuids(vm_ids)
    if not ids:
        return []
    strays = list(
        VM.objects.select_for_update(of=("self",), skip_locked=True)
        .filter(pk__in=ids)
        .exclude(node=node)
        .select_related("image", "node")
    )
    if not strays:
        return []
    now = timezone.now()
    grace = timedelta(seconds=MIGRATION_LEFTOVER_GRACE_SECONDS)
    cutoff = min(seen, now) - grace
    sent: list[str] = []
    for vm in strays:
        involving = Migration.objects.filter(vm=vm).filter(Q(source_node=node) | Q(dest_node=node))
        if involving.filter(status__in=ACTIVE_STATUSES).exists():
            continue  # this node's copy is the migration's own business
        last = involving.exclude(started_at=None).order_by("-started_at", "-id").first()
        if last is None:
            _note_left_alone(vm, node, "no started migration involved this node")
            continue
        ended = last.finished_at or last.created_at
        if ended >= cutoff:
            continue  # its own cleanup may still be on its way
        if last.status == S.COMPLETED and last.source_node_id == node.pk:
            task, kwargs, what = contract.NODE_MIGRATION_CLEANUP, {}, "source cleanup"
        elif last.status in (S.FAILED, S.CANCELLED) and last.dest_node_id == node.pk:
            task, kwargs, what = contract.NODE_MIGRATION_ABORT, {"role": "dest"}, "destination abort"
            if last.events.filter(detail__startswith="dest kept:").exists():
                # The node kept it at its start: its guest ran there, it may be the VM's only copy.
                _note_left_alone(
                    vm, node, f"{node.name} kept its copy (migration {last.pk}): its guest ran there"
                )
                continue
        else:
            _note_left_alone(vm, node, f"its last migration {last.pk} ({last.status}) does not explain it")
            continue
        attempts = MigrationEvent.objects.filter(migration=last, actor=_RECONCILER)
        if attempts.filter(at__gte=now - grace).exists():
            continue  # the last re-send may still be on its way
        count = attempts.count()
        if count >= MIGRATION_LEFTOVER_MAX_RESENDS:
            _note_left_alone(vm, node, f"the {what} of migration {last.pk} was sent again {count} times")
            continue
        home = vm.node.name if vm.node else "no node"
        last_try = ""
        if count + 1 == MIGRATION_LEFTOVER_MAX_RESENDS:
            last_try = " (last attempt: remove it by hand if it stays)"
        logger.warning(
            "VM %s still held by node %s, recorded on %s, %d s after migration %s ended %s: %s sent again%s",
            vm.pk,
            node.name,
            home,
            int((now - ended).total_seconds()),
            last.pk,
            last.status,
            what,
            last_try,
        )
        MigrationEvent.objects.create(
            migration=last,
            actor=_RECONCILER,
            from_status=last.status,
            to_status=last.status,
            detail=f"{node.name} still holds a copy (VM recorded on {home}): {what} sent again{last_try}",
        )
        last.vm = vm
        _send(last, node, task, **kwargs)
        sent.append(str(last.pk))
    return sent


@transaction.atomic
def node_migration_copies(*, node: str, copies: list[contract.MigrationCopy]) -> list[str]:
    """Answer a starting node's list of destination copies with those that are leftovers.

    A copy is a leftover when its migration is failed or cancelled, or unknown here (removed with its
    VM), and the VM is not recorded on ``node``. A copy of an active migration, or of a completed one
    (the copy is then the VM), is never named. The node sends back "aborted" or "kept" for each named
    copy (``contract.NODE_MIGRATION_LEFTOVERS``). Returns the migration ids named.
    """
    dest_copies = [copy for copy in copies if copy.get("role") == "dest"]
    valid = {str(value) for value in _valid_uuids(copy["migration_id"] for copy in dest_copies)}
    migrations = {
        str(migration.pk): migration
        for migration in Migration.objects.filter(pk__in=valid).select_related("dest_node")
    }
    held_here = {
        str(pk)
        for pk in VM.objects.filter(
            pk__in=_valid_uuids(copy["vm_id"] for copy in dest_copies), node__name=node
        ).values_list("pk", flat=True)
    }
    ended: list[contract.MigrationCopy] = []
    for copy in dest_copies:
        migration = migrations.get(copy["migration_id"])
        if copy["migration_id"] not in valid or copy["vm_id"] in held_here:
            continue
        if migration is None:
            ended.append(copy)
        elif (
            migration.dest_node.name == node
            and str(migration.vm_id) == copy["vm_id"]
            and migration.status in (S.FAILED, S.CANCELLED)
        ):
            ended.append(copy)
            _note(
                migration, f"{node} started holding its destination copy: asked to remove it", actor="system"
            )
    if ended:
        signature = dispatch.app.signature(
            contract.NODE_MIGRATION_LEFTOVERS, kwargs={"ended": ended}, queue=contract.node_queue(node)
        )
        transaction.on_commit(signature.apply_async)
    return [copy["migration_id"] for copy in ended]


def _valid_uuids(values: Iterable[str]) -> list[uuid.UUID]:
    valid = []
    for value in values:
        try:
            valid.append(uuid.UUID(str(value)))
        except ValueError:
            logger.warning("heartbeat lists a VM id that is no UUID: %r; ignored", str(value)[:100])
    return valid


def _note_left_alone(vm: VM, node: Node, why: str) -> None:
    """Warn about a stray copy this reconciliation does not remove: once per grace period, not per beat."""
    if cache.add(f"migrations:stray-copy:{node.pk}:{vm.pk}", 1, MIGRATION_LEFTOVER_GRACE_SECONDS):
        logger.warning(
            "VM %s is recorded on %s (%s) but node %s holds a copy: %s; left alone",
            vm.pk,
            vm.node.name if vm.node else "no node",
            vm.state,
            node.name,
            why,
        )


# --- Drain ------------------------------------------------------------------------------------------


def node_drain(*, node: Node, requested_by: User) -> dict[str, Any]:
    """Move every VM off ``node`` (live when running, cold when stopped); the node goes to maintenance
    once it is empty. Per-VM results: the migration id, or why it could not be requested."""
    with transaction.atomic():
        node = Node.objects.select_for_update().get(pk=node.pk)
        if node.status == NodeStatus.DOWN:
            raise InvalidState(f"Node {node.name} is down: its VMs cannot be moved live.")
        node.status = NodeStatus.DRAINING
        node.status_reason = f"Draining, requested by {requested_by.get_username()}."
        node.save(update_fields=["status", "status_reason", "updated_at"])
    results: list[dict[str, Any]] = []
    vms = VM.objects.filter(node=node).exclude(state__in=[VMState.DELETED]).order_by("created_at")
    for vm in vms:
        if vm.state == VMState.MIGRATING:
            active = Migration.objects.filter(vm=vm, status__in=ACTIVE_STATUSES).first()
            results.append(
                {
                    "vm": str(vm.pk),
                    "name": vm.name,
                    "migration": str(active.pk) if active else None,
                    "result": "already migrating",
                }
            )
            continue
        mode = MigrationMode.LIVE if vm.state == VMState.RUNNING else MigrationMode.COLD
        try:
            migration = migration_request(vm=vm, requested_by=requested_by, mode=mode)
        except (InvalidState, Conflict, InvalidInput, NoCapacity) as exc:
            results.append({"vm": str(vm.pk), "name": vm.name, "migration": None, "result": exc.message})
            continue
        results.append(
            {
                "vm": str(vm.pk),
                "name": vm.name,
                "migration": str(migration.pk),
                "result": f"{mode} migration queued",
            }
        )
    node_drain_progress(node_id=node.pk)
    return {"node": node.name, "status": Node.objects.get(pk=node.pk).status, "vms": results}


@transaction.atomic
def node_drain_progress(*, node_id: int) -> None:
    """A draining node with no VM left and no migration in flight goes to maintenance."""
    node = Node.objects.select_for_update().get(pk=node_id)
    if node.status != NodeStatus.DRAINING:
        return
    busy = (
        VM.objects.filter(node=node).exclude(state=VMState.DELETED).exists()
        or Migration.objects.filter(
            Q(source_node=node) | Q(dest_node=node), status__in=ACTIVE_STATUSES
        ).exists()
    )
    if not busy:
        node.status = NodeStatus.MAINTENANCE
        node.status_reason = "Drained: no VMs left."
        node.save(update_fields=["status", "status_reason", "updated_at"])
