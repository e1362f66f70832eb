"""Grafana dashboards and the Prometheus config in deploy/ agree with what /metrics exposes."""

import json
import re
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[3]
DASHBOARDS = sorted((ROOT / "deploy/grafana/dashboards").glob("*.json"))
SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")


def _family(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def test_the_four_dashboards_of_the_issue_exist():
    titles = {json.loads(path.read_text())["title"] for path in DASHBOARDS}
    assert titles == {
        "NovaCron / API performance",
        "NovaCron / Database and cache",
        "NovaCron / DWCP and migrations",
        "NovaCron / Resources",
    }


@pytest.mark.django_db
def test_every_series_a_dashboard_queries_is_exposed_at_metrics(client, staff, node):
    client.force_login(staff)
    client.get("/api/v1/nodes/")
    exposed = {
        family.name for family in text_string_to_metric_families(client.get("/metrics").content.decode())
    }
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        uids = set()
        for panel in board["panels"]:
            assert panel["datasource"]["uid"] == "prometheus"
            assert panel["id"] not in uids
            uids.add(panel["id"])
            for target in panel["targets"]:
                for name in re.findall(r"\bnovacron_[a-z_]+", target["expr"]):
                    assert _family(name) in exposed, f"{path.name}: {name} is not exposed at /metrics"


def test_compose_provisions_prometheus_and_grafana_from_deploy():
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    prometheus = compose["services"]["prometheus"]
    mounts = {
        volume.split(":")[0]: volume.split(":")[1]
        for volume in prometheus["volumes"]
        if volume.startswith("./")
    }
    config_path = ROOT / "deploy/prometheus/prometheus.yml"
    assert mounts["./deploy/prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    config = yaml.safe_load(config_path.read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == ["web:8000"]
    token_file = job["authorization"]["credentials_file"]
    assert any(entry["target"] == token_file for entry in prometheus["configs"])
    assert "web" in compose["x-novacron-env"]["ALLOWED_HOSTS"]
    grafana = compose["services"]["grafana"]
    targets = {volume.split(":")[1] for volume in grafana["volumes"]}
    assert {"/etc/grafana/provisioning", "/var/lib/grafana/dashboards"} <= targets
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/novacron.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
