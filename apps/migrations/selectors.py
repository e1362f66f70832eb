"""Reads of migrations through the caller's tenancy."""

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db.models import QuerySet

from .models import Migration


def migration_visible(*, user: AbstractBaseUser | AnonymousUser) -> QuerySet[Migration]:
    queryset = Migration.objects.select_related("vm", "source_node", "dest_node", "requested_by")
    if getattr(user, "is_staff", False):
        return queryset
    return queryset.filter(vm__owner_id=user.pk)
