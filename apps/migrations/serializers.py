"""Shapes of migration requests and records."""

from typing import Any

from rest_framework import serializers

from apps.core.serializers import NameOrIdField, StrictInputMixin
from apps.vms.models import Node

from .choices import MigrationMode
from .models import Migration


class MigrationSerializer(serializers.ModelSerializer[Migration]):
    vm_name = serializers.CharField(source="vm.name", read_only=True)
    source_node = serializers.CharField(source="source_node.name", read_only=True)
    dest_node = serializers.CharField(source="dest_node.name", read_only=True)
    requested_by = serializers.CharField(
        source="requested_by.username", read_only=True, allow_null=True, default=None
    )

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
            "requested_by",
            "bandwidth_limit_mbps",
            "created_at",
            "started_at",
            "finished_at",
            "error",
            "stats",
        )
        read_only_fields = fields


class MigrateRequestSerializer(StrictInputMixin, serializers.Serializer[Any]):
    dest_node = NameOrIdField(Node.objects.all(), required=False, allow_null=True)
    mode = serializers.ChoiceField(choices=MigrationMode.choices, default=MigrationMode.LIVE)
    bandwidth_limit_mbps = serializers.IntegerField(
        min_value=1, max_value=400_000, required=False, allow_null=True
    )
