"""The covering index of a user's live-VM usage (``vms_owner_usage_idx``, partial, with vcpus and memory)."""

from django.db import migrations, models

from apps.core.db import AddIndexConcurrentlyWherePossible


class Migration(migrations.Migration):
    # CREATE INDEX CONCURRENTLY cannot run inside a transaction.
    atomic = False

    dependencies = [("vms", "0003_vms_error_created_idx")]

    operations = [
        AddIndexConcurrentlyWherePossible(
            model_name="vm",
            index=models.Index(
                condition=models.Q(("state", "deleted"), _negated=True),
                fields=["owner"],
                include=("vcpus", "memory_mb"),
                name="vms_owner_usage_idx",
            ),
        ),
    ]
