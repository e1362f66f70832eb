"""The node worker's NICs: ``workers.net``'s data plane wired around its VMs' lives.

Order is the invariant: a VM's taps exist before its QEMU starts (create, start, reboot, a migration's
destination before the RAM arrives) and go only after its QEMU is gone (delete, the source's cleanup
after the switch, an aborted destination). A VM without NICs never touches the data plane, so a node
that cannot network (its probe's reason goes out in the registration) still runs such VMs, and
refuses a VM with NICs with that reason.
"""

import json
import logging
from collections.abc import Mapping
from typing import Any, Unpack

from workers import contract
from workers.net import names
from workers.net.dataplane import DataPlane, NetSettings, probe
from workers.net.model import vm_nics
from workers.qemu import QemuDriver

from .config import NodeConfig

logger = logging.getLogger(__name__)


class NodeNetwork:
    def __init__(self, config: NodeConfig) -> None:
        self.tag = names.node_tag(config.name, config.data_dir)  # the QEMU driver's device_tag too
        self.vxlan_port = config.vxlan_port
        self.problem = probe(config.address)
        self.plane = DataPlane(
            NetSettings(
                tag=self.tag,
                underlay_address=config.address,
                vxlan_port=config.vxlan_port,
                state_dir=config.data_dir / "net",
                physical_networks=config.physical_networks,
            ),
            problem=self.problem,
        )

    def attach(self, uuid: str, vm: Mapping[str, Any]) -> None:
        """Wire the NICs of ``vm`` (a ``VmDescription``; ``uuid``: its canonical id, as the driver's);
        raises ``NetworkError`` with the reason."""
        self.plane.attach(uuid, vm_nics(vm))

    def detach(self, uuid: str) -> None:
        self.plane.detach(uuid)

    def set_peers(self, **request: Unpack[contract.NetworkPeers]) -> None:
        self.plane.set_peers(request["peers"], complete=request["complete"])

    def reconcile(self, driver: QemuDriver) -> None:
        """At start: wire the NICs of every VM this node holds (from their stored specs, or what this
        node recorded when it wired them), with the peers it last heard; remove everything else."""
        if self.problem:
            logger.warning("node cannot attach NICs: %s", self.problem)
            return
        recorded = self.plane.recorded()
        vms: dict[str, list[contract.NicDescription]] = {}
        for status in driver.discover():
            try:
                stored = json.loads(driver.paths(status.uuid).spec.read_text())
            except (OSError, ValueError):
                stored = {}
            vms[status.uuid] = stored["nics"] if "nics" in stored else recorded.get(status.uuid, [])
        self.plane.reconcile(vms)
