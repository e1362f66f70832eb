"""App configuration of ``apps.projects``."""

from django.apps import AppConfig


class ProjectsConfig(AppConfig):
    name = "apps.projects"
    label = "projects"
    verbose_name = "Projects, members and quotas"

    def ready(self) -> None:
        from . import signals  # noqa: F401, PLC0415 - registers the receivers
