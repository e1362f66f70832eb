"""App configuration of ``apps.vms``."""

from django.apps import AppConfig


class VMsConfig(AppConfig):
    name = "apps.vms"
    label = "vms"
    verbose_name = "VMs, nodes and images"
