"""App configuration of ``apps.monitoring``."""

from django.apps import AppConfig


class MonitoringConfig(AppConfig):
    name = "apps.monitoring"
    label = "monitoring"
    verbose_name = "Monitoring"

    def ready(self) -> None:
        # Defines the Prometheus instruments and connects the Celery task signals in every process
        # that loads Django (web workers, the control worker, beat).
        from . import instruments  # noqa: F401, PLC0415
