"""The shape of an audit event in the API."""

from rest_framework import serializers

from .models import AuditEvent


class AuditEventSerializer(serializers.ModelSerializer[AuditEvent]):
    actor = serializers.CharField(source="actor_name", help_text="The actor's username when it acted.")
    project = serializers.CharField(source="project_name", help_text="The project's name at the time.")

    class Meta:
        model = AuditEvent
        fields = (
            "id",
            "timestamp",
            "actor_id",
            "actor",
            "project_id",
            "project",
            "action",
            "target_type",
            "target_id",
            "request_id",
            "status",
            "outcome",
            "detail",
        )
        read_only_fields = fields
