"""Serializer building blocks shared by the apps: strict input and name-or-id references."""

from typing import Any

from django.db.models import Model, QuerySet
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers


class StrictInputMixin:
    """Reject keys the serializer does not know, instead of silently ignoring a client's typo."""

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, dict):
            known = set(self.fields)  # type: ignore[attr-defined]
            unknown = sorted(str(key) for key in data if key not in known)
            if unknown:
                raise serializers.ValidationError({key: ["Unknown field."] for key in unknown})
        return super().to_internal_value(data)  # type: ignore[misc]


@extend_schema_field(OpenApiTypes.STR)
class NameOrIdField(serializers.Field):
    """A reference to a named object given as its name or its integer id; shown as its name.

    Look-ups are cached in the serializer context (``context["refs"]``), so a batch of a thousand
    items naming the same image costs one query.
    """

    default_error_messages = {
        "not_found": "No {model} named or numbered {value!r}.",
        "invalid": "Give the {model}'s name or id.",
    }

    def __init__(self, queryset: QuerySet[Any], **kwargs: Any) -> None:
        self.queryset = queryset
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> Model:
        model = self.queryset.model._meta.verbose_name
        if isinstance(data, bool) or not isinstance(data, (str, int)) or data == "":
            self.fail("invalid", model=model)
        if isinstance(data, str) and ("\x00" in data or len(data) > 255):
            self.fail("invalid", model=model)
        refs: dict[tuple[str, Any], Model | None] = self.context.setdefault("refs", {})  # type: ignore[attr-defined]
        key = (self.queryset.model._meta.label, data)
        if key not in refs:
            text = str(data)
            if text.isdigit() and len(text) < 19:
                refs[key] = (
                    self.queryset.filter(pk=int(text)).first() or self.queryset.filter(name=text).first()
                )
            else:
                refs[key] = self.queryset.filter(name=text[:200]).first()
        found = refs[key]
        if found is None:
            self.fail("not_found", model=model, value=data)
        return found

    def to_representation(self, value: Any) -> str:
        return str(value.name)
