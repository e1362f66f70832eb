"""VMs and batches belong to projects (issue 20): every owner's rows land in their personal project.

For each user who owns a VM or a batch, or has a quota row, a personal project ``~<username>`` is
made (unless they have one) with the user as its admin and their quota row's limits (else the
default quota); then every VM and batch gets its owner's personal project. The next migration makes
the column NOT NULL and drops the per-user quota table (its limits now live on the projects): in a
transaction of its own, since PostgreSQL refuses to alter a table with pending trigger events (the
foreign-key checks of the rows written here). Nothing is lost:
``tests/apps/projects/test_data_migration.py`` runs these on a populated database.
"""

from typing import Any

from django.conf import settings
from django.db import migrations, models
from django.db.models import OuterRef, Subquery


def _to_personal_projects(apps: Any, schema_editor: Any) -> None:
    user_model = apps.get_model(*settings.AUTH_USER_MODEL.split("."))
    project_model = apps.get_model("projects", "Project")
    membership_model = apps.get_model("projects", "Membership")
    vm_model = apps.get_model("vms", "VM")
    batch_model = apps.get_model("vms", "BatchOperation")
    quota_model = apps.get_model("vms", "Quota")
    # The limits a project had at this migration (later ones, max_networks, come with their own).
    historical = ("max_vms", "max_vcpus", "max_memory_mb")
    defaults = {key: settings.NOVACRON["DEFAULT_QUOTA"][key] for key in historical}
    quotas = {
        row["user_id"]: {key: row[key] for key in historical}
        for row in quota_model.objects.values("user_id", "max_vms", "max_vcpus", "max_memory_mb")
    }
    owners = (
        set(vm_model.objects.values_list("owner_id", flat=True).distinct())
        | set(batch_model.objects.values_list("owner_id", flat=True).distinct())
        | set(quotas)
    )
    having = set(
        project_model.objects.filter(personal_of_id__in=owners).values_list("personal_of_id", flat=True)
    )
    for user_id, username in user_model.objects.filter(pk__in=owners - having).values_list("pk", "username"):
        limits = quotas.get(user_id, defaults)
        project = project_model.objects.create(name=f"~{username}", personal_of_id=user_id, **limits)
        membership_model.objects.create(project=project, user_id=user_id, role="admin")
    personal = project_model.objects.filter(personal_of_id=OuterRef("owner_id")).values("pk")[:1]
    vm_model.objects.filter(project__isnull=True).update(project_id=Subquery(personal))
    batch_model.objects.filter(project__isnull=True).update(project_id=Subquery(personal))


class Migration(migrations.Migration):
    dependencies = [
        ("vms", "0004_vms_owner_usage_idx"),
        ("projects", "0001_initial"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.AddField(
            model_name="vm",
            name="project",
            field=models.ForeignKey(
                null=True,
                db_index=False,
                help_text="Who the VM belongs to: its members see and act on it, its quota counts it.",
                on_delete=models.deletion.PROTECT,
                related_name="vms",
                to="projects.project",
            ),
        ),
        migrations.AddField(
            model_name="batchoperation",
            name="project",
            field=models.ForeignKey(
                null=True, on_delete=models.deletion.PROTECT, related_name="batches", to="projects.project"
            ),
        ),
        migrations.RunPython(_to_personal_projects, migrations.RunPython.noop),
    ]
