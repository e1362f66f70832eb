"""Networks and NICs as the data plane takes them: what it refuses, and the derived names."""

import pytest

from tests.workers.net.conftest import network
from workers import contract
from workers.net.dataplane import probe
from workers.net.model import NetworkError, gateway_mac, parse_nics, vm_nics

VM = "8d2e1c44-5a6b-4c7d-8e9f-0a1b2c3d4e5f"


def nic(**changes: object) -> dict[str, object]:
    described: dict[str, object] = {
        "mac": "52:54:00:aa:bb:cc",
        "ipv4": "172.31.9.10",
        "network": network(9, 9),
    }
    described.update(changes)
    return described


def test_a_valid_nic_gives_its_tap_bridge_and_vxlan_names() -> None:
    (parsed,) = parse_nics(VM, [nic()])
    assert parsed.tap("ab12") == "tab128d2e1c4450"
    assert (parsed.network.bridge("ab12"), parsed.network.vxlan("ab12")) == ("bab12000009", "xab12000009")
    assert str(parsed.network.gateway) == "172.31.9.1"


def test_the_gateway_mac_is_derived_from_the_vni_alike_on_every_node() -> None:
    assert gateway_mac(0x123456) == "02:6e:63:12:34:56"
    assert int(gateway_mac(1)[:2], 16) & 0b11 == 0b10  # locally administered, unicast


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"mac": "52:54:00:AA:BB:CC"}, "lower-case unicast MAC"),
        ({"mac": "01:00:5e:00:00:01"}, "lower-case unicast MAC"),
        ({"ipv4": "172.31.8.10"}, "not a guest address of 172.31.9.0/24"),
        ({"ipv4": "172.31.9.1"}, "not a guest address"),
        ({"ipv4": "nonsense"}, "ipv4 'nonsense' is not valid"),
        ({"network": {**network(9, 9), "vni": 0}}, "vni must be 1 to 16777215"),
        ({"network": {**network(9, 9), "gateway": "10.0.0.1"}}, "not a host address of 172.31.9.0/24"),
        ({"network": {**network(9, 9), "mtu": 100}}, "mtu must be"),
        ({"network": {**network(9, 9), "cidr": "172.31.9.0/31"}}, "leaves no room"),
        ({"network": {**network(9, 9), "external": "yes"}}, "external must be a bool"),
        ({"mac": None}, "mac must be a str"),
    ],
)
def test_bad_nics_are_refused_naming_the_field(changes: dict[str, object], message: str) -> None:
    with pytest.raises(NetworkError, match=message):
        parse_nics(VM, [nic(**changes)])


def test_more_nics_than_tap_names_allow_are_refused() -> None:
    with pytest.raises(NetworkError, match="at most 8"):
        parse_nics(VM, [nic()] * 9)


def test_a_vm_description_without_nics_has_none() -> None:
    vm: contract.VmDescription = {
        "id": VM,
        "name": "a",
        "vcpus": 1,
        "memory_mb": 64,
        "disk_gb": 1,
        "image": {"kind": "kernel"},
    }
    assert vm_nics(vm) == []


def test_the_probe_refuses_an_underlay_address_that_is_no_ipv4_address() -> None:
    assert "not an IPv4 address" in probe("node1.example")
