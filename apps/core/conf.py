"""Accessor for NovaCron's own settings (the ``NOVACRON`` dict), so defaults live in one place."""

from typing import Any

from django.conf import settings


def novacron_setting(name: str) -> Any:
    """Return ``settings.NOVACRON[name]``; a missing key is a programming error, not a config default."""
    return settings.NOVACRON[name]
