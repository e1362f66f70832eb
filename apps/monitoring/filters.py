"""Query filters of the API log and alert lists; bad values answer 400 in the error shape."""

import django_filters
from django.db.models import Q, QuerySet

from apps.core.filters import UTCDateTimeFilter

from .choices import AlertStatus, Severity
from .models import Alert, APILog

METHODS = [
    (method, method) for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "OTHER")
]


class APILogFilter(django_filters.FilterSet):
    user = django_filters.CharFilter(method="filter_user", max_length=150, help_text="Username or id.")
    method = django_filters.ChoiceFilter(choices=METHODS)
    endpoint = django_filters.CharFilter(max_length=255, help_text="Route pattern, e.g. /api/v1/vms/{pk}/.")
    status = django_filters.NumberFilter(min_value=100, max_value=599)
    status_min = django_filters.NumberFilter(
        field_name="status", lookup_expr="gte", min_value=100, max_value=599
    )
    since = UTCDateTimeFilter(field_name="timestamp", lookup_expr="gte")
    until = UTCDateTimeFilter(field_name="timestamp", lookup_expr="lt")

    class Meta:
        model = APILog
        fields = ("user", "method", "endpoint", "status", "status_min", "since", "until")

    def filter_user(self, queryset: QuerySet[APILog], name: str, value: str) -> QuerySet[APILog]:
        if value.isdigit() and len(value) < 19:
            return queryset.filter(Q(user_id=int(value)) | Q(user__username=value))
        return queryset.filter(user__username=value)


class AlertFilter(django_filters.FilterSet):
    status = django_filters.MultipleChoiceFilter(choices=AlertStatus.choices)
    severity = django_filters.MultipleChoiceFilter(choices=Severity.choices)

    class Meta:
        model = Alert
        fields = ("status", "severity", "rule")
