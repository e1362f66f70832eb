"""Query filters of the VM list (``?state=&node=&name=``); bad values answer 400."""

import django_filters
from django.db.models import Q, QuerySet

from .choices import VMState
from .models import VM


class VMFilter(django_filters.FilterSet):
    state = django_filters.ChoiceFilter(choices=VMState.choices)
    node = django_filters.CharFilter(method="filter_node", max_length=63, help_text="Node name or id.")
    name = django_filters.CharFilter(max_length=63)

    class Meta:
        model = VM
        fields = ("state", "node", "name")

    def filter_node(self, queryset: QuerySet[VM], name: str, value: str) -> QuerySet[VM]:
        if value.isdigit():
            return queryset.filter(Q(node_id=int(value)) | Q(node__name=value))
        return queryset.filter(node__name=value)
