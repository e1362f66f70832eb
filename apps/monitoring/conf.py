"""Accessor for the ``MONITORING`` settings dict, so every option has its default in one place."""

from typing import Any

from django.conf import settings


def monitoring_setting(name: str) -> Any:
    """Return ``settings.MONITORING[name]``; a missing key is a programming error."""
    return settings.MONITORING[name]
