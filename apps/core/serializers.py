"""Serializer building blocks shared by the apps: strict input and name-or-id references."""

from typing import Any

from django.db.models import Model
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from apps.core.db import get_by


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
    """A reference to a named object of ``model`` given as its name or its integer id; shown as its name.

    Look-ups are one fixed statement each (:func:`apps.core.db.get_by`), cached in the serializer
    context (``context["refs"]``), so a batch of a thousand items naming the same image costs one query.
    """

    default_error_messages = {
        "not_found": "No {model} named or numbered {value!r}.",
        "invalid": "Give the {model}'s name or id.",
    }

    def __init__(self, model: type[Model], **kwargs: Any) -> None:
        self.model = model
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> Model:
        model = self.model._meta.verbose_name
        if isinstance(data, bool) or not isinstance(data, (str, int)) or data == "":
            self.fail("invalid", model=model)
        if isinstance(data, str) and ("\x00" in data or len(data) > 255):
            self.fail("invalid", model=model)
        refs: dict[tuple[str, Any], Model | None] = self.context.setdefault("refs", {})  # type: ignore[attr-defined]
        key = (self.model._meta.label, data)
        if key not in refs:
            text = str(data)
            if text.isdigit() and len(text) < 19:
                refs[key] = get_by(self.model, self.model._meta.pk.name, int(text)) or get_by(
                    self.model, "name", text
                )
            else:
                refs[key] = get_by(self.model, "name", text[:200])
        found = refs[key]
        if found is None:
            self.fail("not_found", model=model, value=data)
        return found

    def to_representation(self, value: Any) -> str:
        return str(value.name)
