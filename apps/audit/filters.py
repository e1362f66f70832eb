"""Query filters of the audit trail; a bad value answers 400 naming the filter."""

import django_filters
from django.core.exceptions import ValidationError
from django.db.models import Q, QuerySet

from apps.core.filters import UTCDateTimeFilter

from .choices import ACTION_PREFIXES, AuditAction, Outcome
from .models import TARGET_ID_MAX, AuditEvent

USER_ID_MAX_DIGITS = 18  # longer digit strings are usernames, not ids a bigint holds


def validate_action(value: str) -> None:
    if value not in AuditAction.values and value not in ACTION_PREFIXES:
        raise ValidationError(
            f"Unknown action {value!r}: give an action such as vm.create, or a prefix such as vm."
        )


class AuditEventFilter(django_filters.FilterSet):
    project = django_filters.NumberFilter(field_name="project_id", min_value=1, help_text="Project id.")
    actor = django_filters.CharFilter(method="filter_actor", max_length=150, help_text="User id or username.")
    action = django_filters.CharFilter(
        method="filter_action",
        max_length=32,
        validators=[validate_action],
        help_text="An action (vm.create) or the prefix of its target type (vm.).",
    )
    target = django_filters.CharFilter(
        field_name="target_id", max_length=TARGET_ID_MAX, help_text="Target id."
    )
    outcome = django_filters.ChoiceFilter(choices=Outcome.choices)
    since = UTCDateTimeFilter(field_name="timestamp", lookup_expr="gte")
    until = UTCDateTimeFilter(field_name="timestamp", lookup_expr="lt")

    class Meta:
        model = AuditEvent
        fields = ("project", "actor", "action", "target", "outcome", "since", "until")

    def filter_actor(self, queryset: QuerySet[AuditEvent], name: str, value: str) -> QuerySet[AuditEvent]:
        if value.isdigit() and len(value) <= USER_ID_MAX_DIGITS:
            return queryset.filter(Q(actor_id=int(value)) | Q(actor_name=value))
        return queryset.filter(actor_name=value)

    def filter_action(self, queryset: QuerySet[AuditEvent], name: str, value: str) -> QuerySet[AuditEvent]:
        if value.endswith("."):
            return queryset.filter(action__startswith=value)
        return queryset.filter(action=value)
