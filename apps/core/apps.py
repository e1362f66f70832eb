"""App configuration of ``apps.core``."""

from django.apps import AppConfig


class CoreConfig(AppConfig):
    name = "apps.core"
    label = "core"
    verbose_name = "Accounts and quotas"

    def ready(self) -> None:
        # Connects the receivers that drop a token's memo when the token or its user changes.
        from . import signals  # noqa: F401, PLC0415
