"""Migration endpoints: list and detail, scoped to the caller."""

from django.db.models import QuerySet
from rest_framework import mixins, viewsets

from .models import Migration
from .selectors import migration_visible
from .serializers import MigrationSerializer


class MigrationViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet[Migration]):
    serializer_class = MigrationSerializer
    filterset_fields = ("status", "mode", "vm")

    def get_queryset(self) -> QuerySet[Migration]:
        return migration_visible(user=self.request.user)
