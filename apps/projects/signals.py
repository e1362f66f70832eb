"""Signal receivers of ``apps.projects``: a new user gets their personal project at once, so that no
request pays for making it (users made around the ORM's signals get it on first use)."""

from typing import Any

from django.contrib.auth import get_user_model
from django.db.models.signals import post_save
from django.dispatch import receiver

from .services import personal_project


@receiver(post_save, sender=get_user_model(), dispatch_uid="projects.user_created")
def user_created(sender: Any, instance: Any, created: bool, raw: bool = False, **kwargs: Any) -> None:
    if created and not raw:
        personal_project(instance)
