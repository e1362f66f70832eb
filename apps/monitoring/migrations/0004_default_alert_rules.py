# The default alert rules, loaded as data (operators edit them in admin or at /api/v1/alert-rules/;
# rows already present under the same name are left as they are).

from django.db import migrations

GIB = 1024**3

DEFAULT_RULES = [
    {
        "name": "API latency p95 above 100 ms",
        "metric": "api.latency_p95_ms",
        "aggregation": "avg",
        "comparison": "gt",
        "threshold": 100.0,
        "window_seconds": 60,
        "for_seconds": 300,
        "severity": "warning",
        "scope": "global",
    },
    {
        "name": "Database query average above 50 ms",
        "metric": "db.query_avg_ms",
        "aggregation": "avg",
        "comparison": "gt",
        "threshold": 50.0,
        "window_seconds": 60,
        "for_seconds": 300,
        "severity": "warning",
        "scope": "global",
    },
    {
        "name": "Node CPU above 70%",
        "metric": "node.cpu_percent",
        "aggregation": "avg",
        "comparison": "gt",
        "threshold": 70.0,
        "window_seconds": 60,
        "for_seconds": 600,
        "severity": "warning",
        "scope": "node",
    },
    {
        "name": "Node memory used above 8 GiB",
        "metric": "node.memory_used_bytes",
        "aggregation": "avg",
        "comparison": "gt",
        "threshold": float(8 * GIB),
        "window_seconds": 60,
        "for_seconds": 600,
        "severity": "warning",
        "scope": "node",
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
    dependencies = [("monitoring", "0003_metrics_name_timestamp_idx")]

    operations = [migrations.RunPython(load, unload)]
