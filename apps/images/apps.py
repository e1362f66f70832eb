"""App configuration of ``apps.images``."""

from django.apps import AppConfig


class ImagesConfig(AppConfig):
    name = "apps.images"
    label = "images"
    verbose_name = "Image store and node caches"

    def ready(self) -> None:
        from . import fetch_tasks  # noqa: F401, PLC0415 - registers the control tasks (not named tasks.py)
