"""Query filters shared by the API's lists.

:class:`UTCDateTimeFilter` is django-filter's ISO 8601 filter whose value reaches the database in
UTC: an offset PostgreSQL does not take (beyond +-15:59, which Python's datetimes allow) or a
moment out of a datetime's range once in UTC answers 400, never a database error.
"""

from datetime import UTC, datetime
from typing import Any

import django_filters
from django.core.exceptions import ValidationError
from django_filters.fields import IsoDateTimeField


class _UTCDateTimeField(IsoDateTimeField):
    def to_python(self, value: Any) -> datetime | None:
        moment: datetime | None = super().to_python(value)
        if moment is None:
            return None
        try:
            return moment.astimezone(UTC)
        except OverflowError as exc:
            raise ValidationError("This moment is out of range.", code="invalid") from exc


class UTCDateTimeFilter(django_filters.IsoDateTimeFilter):
    """An ISO 8601 date and time (with an offset, or in the server's zone), compared in UTC."""

    field_class = _UTCDateTimeField
