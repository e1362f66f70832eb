"""The index of staff's VM list of errors, newest first (``vms_error_created_idx``, partial)."""

from django.db import migrations, models

from apps.core.db import AddIndexConcurrentlyWherePossible


class Migration(migrations.Migration):
    # CREATE INDEX CONCURRENTLY cannot run inside a transaction.
    atomic = False

    dependencies = [("vms", "0002_indexes")]

    operations = [
        AddIndexConcurrentlyWherePossible(
            model_name="vm",
            index=models.Index(
                condition=models.Q(("state", "error")),
                fields=["-created_at", "-id"],
                name="vms_error_created_idx",
            ),
        ),
    ]
