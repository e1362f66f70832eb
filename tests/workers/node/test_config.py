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


def test_vxlan_port_and_physical_networks_come_from_flags_or_environment(monkeypatch: pytest.MonkeyPatch):
    config = from_args(REQUIRED)
    assert (config.vxlan_port, dict(config.physical_networks)) == (4789, {})
    config = from_args([*REQUIRED, "--vxlan-port", "4790", "--physical-networks", "lan=lan0, dmz=eth2"])
    assert (config.vxlan_port, dict(config.physical_networks)) == (4790, {"lan": "lan0", "dmz": "eth2"})
    monkeypatch.setenv("NODE_VXLAN_PORT", "4791")
    monkeypatch.setenv("NODE_PHYSICAL_NETWORKS", "lan=eth1")
    config = from_args(REQUIRED)
    assert (config.vxlan_port, dict(config.physical_networks)) == (4791, {"lan": "eth1"})


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--vxlan-port", "0"], "--vxlan-port must be a UDP port"),
        (["--physical-networks", "lan"], "NAME=INTERFACE"),
        (["--physical-networks", "lan=eth0,lan=eth1"], "mapped twice"),
        (["--physical-networks", "lan=an-interface-name-too-long"], "longer than 15"),
    ],
)
def test_bad_network_settings_are_refused(flags: list[str], message: str):
    with pytest.raises(ConfigError, match=message):
        from_args([*REQUIRED, *flags])


def test_the_image_cache_limit_comes_from_the_flag_or_the_environment(monkeypatch: pytest.MonkeyPatch):
    assert from_args(REQUIRED).image_cache_gb == 50.0
    assert from_args([*REQUIRED, "--image-cache-gb", "0.5"]).image_cache_gb == 0.5
    monkeypatch.setenv("NODE_IMAGE_CACHE_GB", "200")
    assert from_args(REQUIRED).image_cache_gb == 200.0
    with pytest.raises(ConfigError, match="--image-cache-gb must be positive"):
        from_args([*REQUIRED, "--image-cache-gb", "0"])
