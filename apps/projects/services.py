"""Writes of projects: personal projects made on first use (members, quotas: the API's services)."""

from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction

from .models import PERSONAL_PREFIX, Membership, Project, Role


def personal_project(user: AbstractBaseUser) -> Project:
    """The user's personal project, made (with the user as its admin) on first use.

    Concurrent first uses make it once: the loser of the race on ``personal_of`` reads the winner's.
    """
    found = Project.objects.filter(personal_of_id=user.pk).first()
    if found is not None:
        return found
    try:
        with transaction.atomic():
            name = f"{PERSONAL_PREFIX}{user.get_username()}"
            project = Project.objects.create(name=name, personal_of_id=user.pk, **Project.default_quota())
            Membership.objects.create(project=project, user_id=user.pk, role=Role.ADMIN)
    except IntegrityError:
        return Project.objects.get(personal_of_id=user.pk)
    return project
