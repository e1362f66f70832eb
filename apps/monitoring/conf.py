"""Accessor for the ``MONITORING`` settings dict, so every option has its default in one place."""

from typing import Any

from django.conf import settings


def monitoring_setting(name: str) -> Any:
    """Return ``settings.MONITORING[name]``; a missing key is a programming error."""
    # Read by name: mypy's django plugin caches the settings' attributes across runs, and a cache made
    # before the monitoring settings module existed would report MONITORING as missing.
    options: dict[str, Any] = getattr(settings, "MONITORING")  # noqa: B009
    return options[name]
