"""apps/projects/services.py: the project row's lock."""

import pytest
from django.db import transaction

from apps.core.errors import NotFound
from apps.projects.models import Project
from apps.projects.services import lock_project

pytestmark = pytest.mark.django_db


def test_the_lock_returns_the_project_row_and_a_project_gone_meanwhile_is_404():
    project = Project.objects.create(name="locked", **Project.default_quota())
    with transaction.atomic():
        assert lock_project(project.pk).name == "locked"
    project.delete()
    with pytest.raises(NotFound), transaction.atomic():
        lock_project(project.pk)  # a create that waited for the lock of a project being deleted
