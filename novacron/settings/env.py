"""The one place that reads the process environment.

Every setting that can come from the environment goes through :func:`env` so that the README's
configuration table, ``compose.yaml`` and the settings modules agree on names. Required values
raise ``ImproperlyConfigured`` naming the variable, at start, not at first use.
"""

import os
from collections.abc import Callable
from typing import TypeVar, overload

from django.core.exceptions import ImproperlyConfigured

T = TypeVar("T")

_MISSING = object()

#: Every variable the settings read, with its README description (kept in sync by a test).
DOCUMENTED: dict[str, str] = {}


def _to_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"expected a boolean (1/0, true/false, yes/no, on/off), got {raw!r}")


def _to_list(raw: str) -> list[str]:
    return [item.strip() for item in raw.split(",") if item.strip()]


@overload
def env(name: str, default: str, *, help: str) -> str: ...
@overload
def env(name: str, default: T, *, cast: Callable[[str], T], help: str) -> T: ...
@overload
def env(name: str, *, help: str) -> str: ...
def env(name: str, default: object = _MISSING, *, cast: Callable[[str], object] = str, help: str) -> object:
    """Return the variable ``name`` converted by ``cast``; without a default it is required."""
    DOCUMENTED[name] = help
    raw = os.environ.get(name)
    if raw is None or raw == "":
        if default is _MISSING:
            raise ImproperlyConfigured(f"The environment variable {name} is required: {help}")
        return default
    try:
        return cast(raw)
    except ValueError as exc:
        raise ImproperlyConfigured(f"The environment variable {name} is invalid: {exc}") from exc


def env_bool(name: str, default: bool, *, help: str) -> bool:
    return env(name, default, cast=_to_bool, help=help)


def env_int(name: str, default: int, *, help: str) -> int:
    return env(name, default, cast=int, help=help)


def env_list(name: str, default: list[str], *, help: str) -> list[str]:
    return env(name, default, cast=_to_list, help=help)
