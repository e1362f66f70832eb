"""App configuration of ``apps.migrations`` (label ``vm_migrations``: ``migrations`` is Django's own)."""

from django.apps import AppConfig


class VMMigrationsConfig(AppConfig):
    name = "apps.migrations"
    label = "vm_migrations"
    verbose_name = "VM migrations"
