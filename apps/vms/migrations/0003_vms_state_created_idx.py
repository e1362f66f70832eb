"""The index of staff VM lists filtered by state, newest first (``vms_state_created_idx``)."""

from django.db import migrations, models

from apps.core.db import AddIndexConcurrentlyWherePossible


class Migration(migrations.Migration):
    # CREATE INDEX CONCURRENTLY cannot run inside a transaction.
    atomic = False

    dependencies = [("vms", "0002_indexes")]

    operations = [
        AddIndexConcurrentlyWherePossible(
            model_name="vm",
            index=models.Index(fields=["state", "-created_at", "-id"], name="vms_state_created_idx"),
        ),
    ]
