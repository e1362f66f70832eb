"""App configuration of ``apps.networks``."""

from django.apps import AppConfig


class NetworksConfig(AppConfig):
    name = "apps.networks"
    label = "networks"
    verbose_name = "Networks and NICs"
