"""compose.yaml names the services of the design and only variables the settings really read."""

import re
from pathlib import Path

import yaml

from novacron.settings.env import DOCUMENTED

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
# Variables read by the images and processes themselves, not by Django settings.
NOT_SETTINGS = {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"}
# Read by `manage.py bootstrap` (the admin password) rather than by the settings modules.
BOOTSTRAP = {"NOVACRON_ADMIN_PASSWORD"}
# Grafana's own configuration variables.
GRAFANA_SETTINGS = {"GF_SECURITY_ADMIN_USER", "GF_SECURITY_ADMIN_PASSWORD", "GF_USERS_ALLOW_SIGN_UP"}


def test_compose_has_every_service_of_the_design():
    assert set(COMPOSE["services"]) == {
        "postgres",
        "redis",
        "web",
        "streams",
        "control",
        "beat",
        "flower",
        "node1",
        "node2",
        "prometheus",
        "grafana",
    }


READ_BY_GLIBC = {"MALLOC_ARENA_MAX"}  # the web's malloc arenas (docs/operations.md)


def test_every_variable_compose_sets_is_read_by_the_settings():
    import novacron.settings.main  # noqa: F401  (fills DOCUMENTED)

    for name, service in COMPOSE["services"].items():
        for variable in service.get("environment", {}):
            if name == "postgres":
                assert variable in NOT_SETTINGS
                continue
            if name == "grafana":
                assert variable in GRAFANA_SETTINGS
                continue
            known = DOCUMENTED.keys() | BOOTSTRAP | READ_BY_GLIBC
            assert variable in known, f"{name} sets {variable}, read by nobody"


def test_required_secrets_are_passed_from_the_environment_not_written_down():
    text = (ROOT / "compose.yaml").read_text()
    for secret in (
        "SECRET_KEY",
        "DWCP_SECRET",
        "POSTGRES_PASSWORD",
        "NOVACRON_ADMIN_PASSWORD",
        "METRICS_TOKEN",
    ):
        for value in re.findall(rf"{secret}: (.*)", text):
            assert value.startswith("${"), f"{secret} is written into compose.yaml"


def test_every_variable_the_settings_read_is_in_the_configuration_table():
    import novacron.settings.main  # noqa: F401

    table = (ROOT / "docs" / "operations.md").read_text()
    missing = [
        name for name in DOCUMENTED if not name.startswith("NOVACRON_TEST") and f"`{name}`" not in table
    ]
    assert not missing, f"docs/operations.md's configuration table lacks {missing}"
