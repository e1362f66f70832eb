"""App configuration of ``apps.accounts``."""

from django.apps import AppConfig


class AccountsConfig(AppConfig):
    name = "apps.accounts"
    label = "accounts"
    verbose_name = "Users and API tokens"

    def ready(self) -> None:
        # Connects the receivers that drop a token's memo when the token or its user changes.
        from . import signals  # noqa: F401, PLC0415
