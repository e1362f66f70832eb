# The alert rule on migrations the watchdog hands to an operator (a switching migration whose
# destination cannot be asked: apps.migrations.services.switching_decision), loaded as data like the
# other default rules; a row already present under the same name is left as it is.

from django.db import migrations

DEFAULT_RULES = [
    {
        "name": "Migration waits for an operator",
        "metric": "migrations.needs_operator",
        "aggregation": "max",
        "comparison": "gte",
        "threshold": 1.0,
        "window_seconds": 60,
        "for_seconds": 60,
        "severity": "critical",
        "scope": "global",
    },
]


def load(apps, schema_editor):
    AlertRule = apps.get_model("monitoring", "AlertRule")
    for rule in DEFAULT_RULES:
        AlertRule.objects.get_or_create(name=rule["name"], defaults=rule)


def unload(apps, schema_editor):
    AlertRule = apps.get_model("monitoring", "AlertRule")
    AlertRule.objects.filter(name__in=[rule["name"] for rule in DEFAULT_RULES]).delete()


class Migration(migrations.Migration):
    dependencies = [("monitoring", "0004_default_alert_rules")]

    operations = [migrations.RunPython(load, unload)]
