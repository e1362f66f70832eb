"""App configuration of ``apps.consoles``."""

from django.apps import AppConfig


class ConsolesConfig(AppConfig):
    name = "apps.consoles"
    label = "consoles"
    verbose_name = "Consoles"
