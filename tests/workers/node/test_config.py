"""Node worker settings: flags, their environment defaults, and the errors a person must fix."""

from __future__ import annotations

import pytest

from workers.node.config import ConfigError, from_args

REQUIRED = ["--name", "n1", "--data-dir", "/tmp/n1", "--dwcp-listen", "127.0.0.1:7001"]


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DWCP_SECRET", "s" * 32)
    monkeypatch.delenv("NODE_VERIFY_MEMORY", raising=False)


def test_memory_check_defaults_to_auto_and_follows_flag_and_environment(monkeypatch: pytest.MonkeyPatch):
    assert from_args(REQUIRED).verify_memory == "auto"
    assert from_args([*REQUIRED, "--verify-memory", "off"]).verify_memory == "off"
    monkeypatch.setenv("NODE_VERIFY_MEMORY", "on")
    assert from_args(REQUIRED).verify_memory == "on"


def test_an_unknown_memory_check_setting_in_the_environment_is_refused(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("NODE_VERIFY_MEMORY", "sometimes")
    with pytest.raises(ConfigError, match="NODE_VERIFY_MEMORY must be one of auto, on, off"):
        from_args(REQUIRED)


def test_a_missing_dwcp_secret_is_refused(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("DWCP_SECRET")
    with pytest.raises(ConfigError, match="DWCP_SECRET is not set"):
        from_args(REQUIRED)
