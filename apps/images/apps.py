"""App configuration of ``apps.images``."""

from django.apps import AppConfig


class ImagesConfig(AppConfig):
    name = "apps.images"
    label = "images"
    verbose_name = "Image store and node caches"
