"""Names of the kernel devices a node creates for networks (at most 15 characters, ``IFNAMSIZ - 1``).

Each name holds the node's four-hex-digit tag, so two node workers in one network namespace (a
migration between ``make run``'s local nodes holds a tap of the same VM on both) never collide, and a
node recognises, and removes, only its own devices.
"""

import hashlib
import uuid
from pathlib import Path

MAX_NICS = 8  # per VM: the tap name has one hex digit for the index


def node_tag(node_name: str, data_dir: Path) -> str:
    """Four hex digits that tell this node's devices from other nodes' in the same namespace."""
    digest = hashlib.blake2b(f"{node_name}\0{data_dir}".encode(), digest_size=2).hexdigest()
    return digest


def bridge_name(tag: str, vni: int) -> str:
    return f"b{tag}{vni:06x}"


def vxlan_name(tag: str, vni: int) -> str:
    return f"x{tag}{vni:06x}"


def tap_name(tag: str, vm_uuid: str, index: int) -> str:
    """The tap of NIC ``index`` of a VM: ``t`` + tag + the uuid's first 9 hex digits + the index."""
    if not 0 <= index < MAX_NICS:
        raise ValueError(f"a VM has at most {MAX_NICS} NICs, not an index {index}")
    return f"t{tag}{uuid.UUID(vm_uuid).hex[:9]}{index:x}"


def is_own(tag: str, device: str) -> bool:
    """Whether ``device`` is one of the names above for this node's tag."""
    return len(device) > 5 and device[0] in "bxt" and device[1:5] == tag
