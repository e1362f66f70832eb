# Series, alert windows and the dashboard read one metric over a time range.

from django.db import migrations, models

from apps.core.db import AddIndexConcurrentlyWherePossible


class Migration(migrations.Migration):
    # CREATE INDEX CONCURRENTLY cannot run inside a transaction.
    atomic = False

    dependencies = [("monitoring", "0002_indexes")]

    operations = [
        AddIndexConcurrentlyWherePossible(
            model_name="metric",
            index=models.Index(fields=["name", "timestamp"], name="metrics_name_timestamp_idx"),
        ),
    ]
