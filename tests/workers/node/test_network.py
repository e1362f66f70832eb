"""The node worker's NICs: what a node that cannot network does with VMs with and without NICs."""

from pathlib import Path

import pytest

from tests.workers.net.conftest import network
from tests.workers.node.conftest import node_config
from workers import contract
from workers.net.model import NetworkError
from workers.node.config import NodeConfig
from workers.node.network import NodeNetwork

VM_ID = "5c1f7a2e-3b4d-4e5f-8a6b-7c8d9e0f1a2b"


def config(data_dir: Path, address: str) -> NodeConfig:
    return node_config(data_dir, address=address)


def vm(nics: list[contract.NicDescription]) -> contract.VmDescription:
    return {
        "id": VM_ID,
        "name": "a",
        "vcpus": 1,
        "memory_mb": 64,
        "disk_gb": 1,
        "image": {"kind": "kernel"},
        "nics": nics,
    }


def test_a_node_that_cannot_network_runs_vms_without_nics_and_refuses_those_with(tmp_path: Path) -> None:
    node = NodeNetwork(config(tmp_path, "node1.example"))
    assert "not an IPv4 address" in node.problem  # what its registration reports

    node.attach(VM_ID, vm([]))
    node.detach(VM_ID)
    with pytest.raises(
        NetworkError, match=r"this node cannot attach NICs: the node address 'node1\.example'"
    ):
        node.attach(
            VM_ID, vm([{"mac": "52:54:00:00:00:01", "ipv4": "172.31.9.10", "network": network(9, 9)}])
        )
    assert not (tmp_path / "net" / "vms").exists() or not list((tmp_path / "net" / "vms").iterdir())


def test_a_bad_nic_is_refused_before_anything_is_made(tmp_path: Path) -> None:
    node = NodeNetwork(config(tmp_path, "127.0.0.1"))
    with pytest.raises(NetworkError, match=r"nics\[0\]: ipv4 10\.0\.0\.5 is not a guest address"):
        node.attach(VM_ID, vm([{"mac": "52:54:00:00:00:01", "ipv4": "10.0.0.5", "network": network(9, 9)}]))
    assert not (tmp_path / "net" / "vms").exists() or not list((tmp_path / "net" / "vms").iterdir())
