"""The project's indexes replace the owner's: its VMs newest first, and its live VMs' usage."""

from django.db import migrations, models

from apps.core.db import AddIndexConcurrentlyWherePossible


class Migration(migrations.Migration):
    # CREATE INDEX CONCURRENTLY cannot run inside a transaction.
    atomic = False

    dependencies = [("vms", "0006_project_required")]

    operations = [
        AddIndexConcurrentlyWherePossible(
            model_name="vm",
            index=models.Index(fields=["project", "-created_at"], name="vms_project_created_idx"),
        ),
        AddIndexConcurrentlyWherePossible(
            model_name="vm",
            index=models.Index(
                condition=models.Q(("state", "deleted"), _negated=True),
                fields=["project"],
                include=("vcpus", "memory_mb"),
                name="vms_project_usage_idx",
            ),
        ),
        migrations.AddIndex(
            model_name="batchoperation",
            index=models.Index(fields=["project", "-created_at"], name="batches_project_created_idx"),
        ),
        migrations.RemoveIndex(model_name="vm", name="vms_owner_created_idx"),
        migrations.RemoveIndex(model_name="vm", name="vms_owner_usage_idx"),
    ]
