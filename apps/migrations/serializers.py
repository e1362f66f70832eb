"""Shapes of migration requests, records, live progress and the audit trail."""

from typing import Any

from django.conf import settings
from rest_framework import serializers

from apps.core.serializers import NameOrIdField, StrictInputMixin
from apps.vms.models import Node
from workers import contract

from . import progress as live
from .choices import ACTIVE_STATUSES, MigrationMode, OnNoConvergence
from .models import Migration, MigrationEvent


class MigrationEventSerializer(serializers.ModelSerializer[MigrationEvent]):
    class Meta:
        model = MigrationEvent
        fields = ("at", "actor", "from_status", "to_status", "phase", "detail")
        read_only_fields = fields


def progress_view(migration: Migration, current: dict[str, Any]) -> dict[str, Any]:
    """The progress block of a migration: live figures while it runs, final ones after."""
    source = current if migration.status in ACTIVE_STATUSES else migration.stats

    def figure(name: str) -> float | None:
        value = source.get(name)
        return float(value) if isinstance(value, (int, float)) else None

    converging = source.get("converging")
    reconnecting = migration.status in ACTIVE_STATUSES and source.get("link") == "reconnecting"

    def triple(prefix: str) -> dict[str, float | None]:
        return {
            "total": figure(f"{prefix}_total"),
            "processed": figure(f"{prefix}_processed"),
            "remaining": figure(f"{prefix}_remaining"),
        }

    memory = triple("memory") | {"dirty_rate": figure("dirty_rate")}
    return {
        "percent": round(max(migration.percent, figure("percent") or 0.0), 2),
        "memory": memory,
        "disk": triple("disk"),
        "wire_bytes": figure("wire_bytes"),
        "rate_bps": figure("rate_bps"),
        # The source's forecast (live): null when unknown, and once the migration ended.
        "eta_seconds": figure("eta_seconds") if migration.status in ACTIVE_STATUSES else None,
        "converging": converging if converging in contract.CONVERGING_VALUES else "unknown",
        "converging_reason": str(source.get("converging_reason") or ""),
        # What the guest lived through (source stop -> destination resume) when both ends reported it;
        # QEMU's own figure (stats.qemu_downtime_ms) leaves out the destination's resume.
        "downtime_ms": figure("guest_pause_ms")
        if figure("guest_pause_ms") is not None
        else figure("qemu_downtime_ms"),
        "total_seconds": figure("total_seconds"),
        # A cut link between the nodes that DWCP is reconnecting (live), and for how long.
        "link": "reconnecting" if reconnecting else "up",
        "outage_seconds": figure("outage_seconds") if reconnecting else None,
    }


class MigrationSerializer(serializers.ModelSerializer[Migration]):
    vm_name = serializers.CharField(source="vm.name", read_only=True)
    source_node = serializers.CharField(source="source_node.name", read_only=True)
    dest_node = serializers.CharField(source="dest_node.name", read_only=True)
    requested_by = serializers.CharField(
        source="requested_by.username", read_only=True, allow_null=True, default=None
    )
    percent = serializers.SerializerMethodField()
    memory = serializers.SerializerMethodField()
    disk = serializers.SerializerMethodField()
    wire_bytes = serializers.SerializerMethodField()
    rate_bps = serializers.SerializerMethodField()
    eta_seconds = serializers.SerializerMethodField()
    converging = serializers.SerializerMethodField()
    converging_reason = serializers.SerializerMethodField()
    downtime_ms = serializers.SerializerMethodField()
    total_seconds = serializers.SerializerMethodField()
    link = serializers.SerializerMethodField()
    outage_seconds = serializers.SerializerMethodField()

    class Meta:
        model = Migration
        fields = (
            "id",
            "vm",
            "vm_name",
            "source_node",
            "dest_node",
            "mode",
            "status",
            "phase",
            "percent",
            "memory",
            "disk",
            "wire_bytes",
            "rate_bps",
            "eta_seconds",
            "converging",
            "converging_reason",
            "downtime_ms",
            "total_seconds",
            "link",
            "outage_seconds",
            "requested_by",
            "bandwidth_limit_mbps",
            "on_no_convergence",
            "force_complete_after_passes",
            "created_at",
            "started_at",
            "finished_at",
            "error",
            "error_cause",
            "needs_operator",
            "attention",
            "stats",
        )
        read_only_fields = fields

    def _progress(self, migration: Migration) -> dict[str, Any]:
        cache: dict[Any, dict[str, Any]] = self.context.setdefault("progress", {})  # type: ignore[attr-defined]
        if migration.pk not in cache:
            current = {}
            if migration.status in ACTIVE_STATUSES:
                import redis  # noqa: PLC0415 - only needed for running migrations

                current = live.read(
                    redis.Redis.from_url(settings.REDIS_URL, socket_timeout=2), str(migration.pk)
                )
            cache[migration.pk] = progress_view(migration, current)
        return cache[migration.pk]

    def get_percent(self, migration: Migration) -> float:
        return float(self._progress(migration)["percent"])

    def get_memory(self, migration: Migration) -> dict[str, float | None]:
        return dict(self._progress(migration)["memory"])

    def get_disk(self, migration: Migration) -> dict[str, float | None]:
        return dict(self._progress(migration)["disk"])

    def get_wire_bytes(self, migration: Migration) -> float | None:
        return self._progress(migration)["wire_bytes"]

    def get_rate_bps(self, migration: Migration) -> float | None:
        return self._progress(migration)["rate_bps"]

    def get_eta_seconds(self, migration: Migration) -> float | None:
        return self._progress(migration)["eta_seconds"]

    def get_converging(self, migration: Migration) -> str:
        return str(self._progress(migration)["converging"])

    def get_converging_reason(self, migration: Migration) -> str:
        return str(self._progress(migration)["converging_reason"])

    def get_downtime_ms(self, migration: Migration) -> float | None:
        return self._progress(migration)["downtime_ms"]

    def get_total_seconds(self, migration: Migration) -> float | None:
        return self._progress(migration)["total_seconds"]

    def get_link(self, migration: Migration) -> str:
        return str(self._progress(migration)["link"])

    def get_outage_seconds(self, migration: Migration) -> float | None:
        return self._progress(migration)["outage_seconds"]


class MigrationDetailSerializer(MigrationSerializer):
    history = MigrationEventSerializer(source="events", many=True, read_only=True)

    class Meta(MigrationSerializer.Meta):
        fields = (*MigrationSerializer.Meta.fields, "history")  # type: ignore[assignment]
        read_only_fields = fields  # type: ignore[assignment]


class MigrateRequestSerializer(StrictInputMixin, serializers.Serializer[Any]):
    dest_node = NameOrIdField(Node, required=False, allow_null=True)
    mode = serializers.ChoiceField(choices=MigrationMode.choices, default=MigrationMode.LIVE)
    bandwidth_limit_mbps = serializers.IntegerField(
        min_value=1, max_value=400_000, required=False, allow_null=True
    )
    on_no_convergence = serializers.ChoiceField(
        choices=OnNoConvergence.choices,
        required=False,
        help_text="Live: what a 'no' convergence verdict leads to (default: MIGRATION_ON_NO_CONVERGENCE).",
    )
    force_complete_after_passes = serializers.IntegerField(
        min_value=1,
        max_value=1000,
        required=False,
        help_text="With force_complete_after: the RAM pass from which the migration is forced to complete.",
    )


class MigrationUpdateSerializer(StrictInputMixin, serializers.Serializer[Any]):
    bandwidth_limit_mbps = serializers.IntegerField(min_value=1, max_value=400_000, allow_null=True)


def webhook_payload(event: MigrationEvent) -> dict[str, Any]:
    """A state change as ``MIGRATION_WEBHOOK_URL`` receives it: the change and the migration now."""
    migration = event.migration
    return {
        "event": {"id": event.pk, **MigrationEventSerializer(event).data},
        "migration": {
            "id": str(migration.pk),
            "vm": str(migration.vm_id),
            "vm_name": migration.vm.name,
            "source_node": migration.source_node.name,
            "dest_node": migration.dest_node.name,
            "mode": migration.mode,
            "status": migration.status,
            "phase": migration.phase,
            "error": migration.error,
        },
    }


class NodeDrainItemSerializer(serializers.Serializer[Any]):
    vm = serializers.UUIDField()
    name = serializers.CharField()
    migration = serializers.UUIDField(allow_null=True)
    result = serializers.CharField()


class NodeDrainSerializer(serializers.Serializer[Any]):
    """The answer of a node drain: the node, its state, and each VM's migration or why it has none."""

    node = serializers.CharField()
    status = serializers.CharField()
    vms = NodeDrainItemSerializer(many=True)
