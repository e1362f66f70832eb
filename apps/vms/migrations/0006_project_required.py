"""VMs and batches must have a project (0005 gave every one its owner's personal project); live VM
names are unique per project, not per owner; the per-user quota table goes."""

from django.conf import settings
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("vms", "0005_projects_own_vms")]

    operations = [
        migrations.AlterField(
            model_name="vm",
            name="project",
            field=models.ForeignKey(
                db_index=False,
                help_text="Who the VM belongs to: its members see and act on it, its quota counts it.",
                on_delete=models.deletion.PROTECT,
                related_name="vms",
                to="projects.project",
            ),
        ),
        migrations.AlterField(
            model_name="batchoperation",
            name="project",
            field=models.ForeignKey(
                on_delete=models.deletion.PROTECT, related_name="batches", to="projects.project"
            ),
        ),
        migrations.AlterField(
            model_name="vm",
            name="owner",
            field=models.ForeignKey(
                db_index=False,
                help_text="Who created the VM.",
                on_delete=models.deletion.PROTECT,
                related_name="vms",
                to=settings.AUTH_USER_MODEL,
            ),
        ),
        migrations.RemoveConstraint(model_name="vm", name="vm_name_unique_per_owner"),
        migrations.AddConstraint(
            model_name="vm",
            constraint=models.UniqueConstraint(
                condition=models.Q(("state", "deleted"), _negated=True),
                fields=("project", "name"),
                name="vm_name_unique_per_project",
            ),
        ),
        migrations.DeleteModel(name="Quota"),
    ]
