"""The environment reader: required variables fail at start naming themselves, casts are checked."""

import os
import subprocess
import sys

import pytest
from django.core.exceptions import ImproperlyConfigured

from novacron.settings.env import env, env_bool, env_int


def test_required_variable_names_itself(monkeypatch):
    monkeypatch.delenv("NOVACRON_TEST_REQUIRED", raising=False)
    with pytest.raises(ImproperlyConfigured, match="NOVACRON_TEST_REQUIRED"):
        env("NOVACRON_TEST_REQUIRED", help="a test")


def test_casts_are_validated(monkeypatch):
    monkeypatch.setenv("NOVACRON_TEST_INT", "12x")
    with pytest.raises(ImproperlyConfigured, match="NOVACRON_TEST_INT"):
        env_int("NOVACRON_TEST_INT", 1, help="a test")
    monkeypatch.setenv("NOVACRON_TEST_BOOL", "maybe")
    with pytest.raises(ImproperlyConfigured, match="NOVACRON_TEST_BOOL"):
        env_bool("NOVACRON_TEST_BOOL", False, help="a test")
    monkeypatch.setenv("NOVACRON_TEST_BOOL", "yes")
    assert env_bool("NOVACRON_TEST_BOOL", False, help="a test") is True


def test_production_start_without_secret_key_fails_naming_it():
    environment = {key: value for key, value in os.environ.items() if key not in ("SECRET_KEY", "DEBUG")}
    environment["DJANGO_SETTINGS_MODULE"] = "novacron.settings.main"
    result = subprocess.run(
        [sys.executable, "manage.py", "check"], env=environment, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "The environment variable SECRET_KEY is required" in result.stderr


def test_deploy_checks_pass_with_production_settings(tmp_path):
    environment = dict(os.environ)
    environment |= {
        "DJANGO_SETTINGS_MODULE": "novacron.settings.main",
        "SECRET_KEY": "a" * 20 + "-production-like-secret-key-with-enough-entropy-9f8e7d",
        "HTTPS": "1",
        "DEBUG": "0",
        "ALLOWED_HOSTS": "novacron.example",
    }
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr + result.stdout
