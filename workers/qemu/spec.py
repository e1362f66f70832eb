"""What a VM is made of, as the driver needs it: `VmSpec`, its boot image and its NICs.

The dictionary form (`VmSpec.to_dict` / `VmSpec.from_dict`) is the node-task contract's
`workers.contract.VmDescription`; it is also what the driver stores as ``run/<uuid>/spec.json`` so a
run directory describes itself after a worker restart. Each NIC keeps its whole network (VNI, subnet,
gateway, DNS, MTU) for the same reason: a node can rebuild its bridges and DHCP leases from its run
directories alone, and its cloud-init seed drive (``seed``, user data included: the run directory is
the worker's alone) likewise. Validation happens here, once, with messages naming the field.
"""

from __future__ import annotations

import ipaddress
import re
import uuid as uuid_module
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workers.contract import (
    ImageDescription,
    NetworkDescription,
    NicDescription,
    SeedDescription,
    VmDescription,
)
from workers.net.names import MAX_NICS
from workers.qemu.errors import InvalidSpec
from workers.qemu.layout import canonical_uuid

DISK_FORMATS = ("qcow2", "raw")
# Generous ceilings that still catch unit mistakes (MiB given as bytes, GiB given as MiB).
MAX_VCPUS = 512
MAX_MEMORY_MB = 4 * 1024 * 1024
MAX_DISK_GB = 64 * 1024
MAX_VNI = 2**24 - 1  # VXLAN network identifiers are 24 bits; 0 is not used
# IPv4's minimum reassembly size up to a jumbo frame less VXLAN's 50 bytes of headers.
MIN_MTU, MAX_MTU = 576, 9000 - 50
MAC_PATTERN = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
# The cloud-init seed's limits: the API validates first and tighter; these are the node's second line.
HOSTNAME_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")  # RFC 1123
MAX_HOSTNAME = 253
MAX_SSH_KEYS = 32
MAX_SSH_KEY_BYTES = 16 * 1024
MAX_USER_DATA_BYTES = 256 * 1024


@dataclass(frozen=True)
class DiskImage:
    """Boot from a base disk: the VM's disk is a qcow2 overlay backed by ``path``."""

    path: Path
    format: str = "qcow2"

    def __post_init__(self) -> None:
        _require_absolute("image.path", self.path)
        if self.format not in DISK_FORMATS:
            raise InvalidSpec(f"image.format must be one of {', '.join(DISK_FORMATS)}, not {self.format!r}")


@dataclass(frozen=True)
class KernelImage:
    """Boot a kernel + initramfs directly; the VM still gets an empty qcow2 disk of ``disk_gb``."""

    kernel_path: Path
    initrd_path: Path | None = None
    cmdline: str = ""

    def __post_init__(self) -> None:
        _require_absolute("image.kernel_path", self.kernel_path)
        if self.initrd_path is not None:
            _require_absolute("image.initrd_path", self.initrd_path)


Image = DiskImage | KernelImage


@dataclass(frozen=True)
class NetworkSpec:
    """The network a NIC is attached to, whole (`workers.contract.NetworkDescription`)."""

    id: str
    name: str
    vni: int
    cidr: str
    gateway: str
    dns: tuple[str, ...] = ()
    mtu: int = 1450
    external: bool = False
    physical_network: str = ""

    def __post_init__(self) -> None:
        if not self.id or not self.name:
            raise InvalidSpec("network.id and network.name must not be empty")
        _require_range("network.vni", self.vni, 1, MAX_VNI)
        _require_range("network.mtu", self.mtu, MIN_MTU, MAX_MTU)
        subnet = self.subnet  # validates cidr
        gateway = _ipv4("network.gateway", self.gateway)
        if gateway not in subnet or gateway in (subnet.network_address, subnet.broadcast_address):
            raise InvalidSpec(f"network.gateway {self.gateway} is not a host address of {self.cidr}")
        for server in self.dns:
            _ipv4("network.dns", server)
        if not isinstance(self.external, bool):
            raise InvalidSpec(f"network.external must be true or false, not {self.external!r}")

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        try:
            return ipaddress.IPv4Network(self.cidr)
        except ValueError as exc:
            raise InvalidSpec(f"network.cidr must be an IPv4 network such as 10.20.0.0/24: {exc}") from None

    def to_dict(self) -> NetworkDescription:
        return {
            "id": self.id,
            "name": self.name,
            "vni": self.vni,
            "cidr": self.cidr,
            "gateway": self.gateway,
            "dns": list(self.dns),
            "mtu": self.mtu,
            "external": self.external,
            "physical_network": self.physical_network,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NetworkSpec:
        return cls(
            id=str(data["id"]),
            name=str(data["name"]),
            vni=_as_int("network.vni", data["vni"]),
            cidr=str(data["cidr"]),
            gateway=str(data["gateway"]),
            dns=tuple(str(server) for server in _as_list("network.dns", data.get("dns") or [])),
            mtu=_as_int("network.mtu", data["mtu"]),
            external=data.get("external", False),
            physical_network=str(data.get("physical_network") or ""),
        )


@dataclass(frozen=True)
class NicSpec:
    """One virtio-net NIC: its MAC, its IPv4 address (handed out by the node's DHCP) and its network."""

    mac: str
    ipv4: str
    network: NetworkSpec

    def __post_init__(self) -> None:
        mac = self.mac.lower() if isinstance(self.mac, str) else ""
        if not MAC_PATTERN.fullmatch(mac):
            raise InvalidSpec(
                f"nic.mac must be six colon-separated hex bytes such as 52:54:00:12:34:56, not {self.mac!r}"
            )
        if int(mac[:2], 16) & 1:
            raise InvalidSpec(f"nic.mac {mac} is a multicast address; a NIC needs a unicast MAC")
        if mac == "00:00:00:00:00:00":
            raise InvalidSpec("nic.mac must not be all zeros")
        object.__setattr__(self, "mac", mac)
        address = _ipv4("nic.ipv4", self.ipv4)
        subnet = self.network.subnet
        if address not in subnet or address in (subnet.network_address, subnet.broadcast_address):
            raise InvalidSpec(f"nic.ipv4 {self.ipv4} is not a host address of the network's {subnet}")
        if address == ipaddress.IPv4Address(self.network.gateway):
            raise InvalidSpec(f"nic.ipv4 {self.ipv4} is the network's gateway address")

    @property
    def prefix_length(self) -> int:
        return self.network.subnet.prefixlen

    def to_dict(self) -> NicDescription:
        return {"mac": self.mac, "ipv4": self.ipv4, "network": self.network.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NicSpec:
        network = data["network"]
        if not isinstance(network, Mapping):
            raise InvalidSpec("nic.network must be an object")
        return cls(mac=data["mac"], ipv4=str(data["ipv4"]), network=NetworkSpec.from_dict(network))


@dataclass(frozen=True)
class SeedSpec:
    """The VM's cloud-init NoCloud seed (`workers.contract.SeedDescription`); built by `workers.qemu.seed`.

    ``user_data`` is the user's opaque text: it is kept out of ``repr`` and out of every error message.
    """

    hostname: str
    ssh_keys: tuple[str, ...] = ()
    user_data: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        hostname = self.hostname if isinstance(self.hostname, str) else ""
        if len(hostname) > MAX_HOSTNAME or not all(
            HOSTNAME_LABEL.fullmatch(label) for label in hostname.split(".")
        ):
            raise InvalidSpec(
                f"seed.hostname must be an RFC 1123 host name (dot-separated labels of letters, digits and "
                f"inner hyphens, each at most 63 characters, {MAX_HOSTNAME} in all), not {self.hostname!r}"
            )
        if len(self.ssh_keys) > MAX_SSH_KEYS:
            raise InvalidSpec(f"seed.ssh_keys holds at most {MAX_SSH_KEYS} keys, not {len(self.ssh_keys)}")
        for index, key in enumerate(self.ssh_keys):
            if not isinstance(key, str) or len(key.split()) < 2 or any(c in key for c in "\r\n\0"):
                raise InvalidSpec(
                    f"seed.ssh_keys[{index}] must be one OpenSSH public key line "
                    "such as 'ssh-ed25519 AAAA... comment'"
                )
            if len(key.encode()) > MAX_SSH_KEY_BYTES:
                raise InvalidSpec(f"seed.ssh_keys[{index}] is longer than {MAX_SSH_KEY_BYTES} bytes")
        if not isinstance(self.user_data, str):
            raise InvalidSpec("seed.user_data must be text")
        size = len(self.user_data.encode("utf-8", errors="replace"))
        if size > MAX_USER_DATA_BYTES:
            raise InvalidSpec(f"seed.user_data is {size} bytes; the limit is {MAX_USER_DATA_BYTES}")
        if "\0" in self.user_data:
            raise InvalidSpec("seed.user_data must not contain NUL characters")

    def to_dict(self) -> SeedDescription:
        return {"hostname": self.hostname, "ssh_keys": list(self.ssh_keys), "user_data": self.user_data}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SeedSpec:
        if not isinstance(data, Mapping):
            raise InvalidSpec("seed must be an object")
        hostname = data.get("hostname")
        if not isinstance(hostname, str):
            raise InvalidSpec("seed.hostname must be a string")
        return cls(
            hostname=hostname,
            ssh_keys=tuple(_as_list("seed.ssh_keys", data.get("ssh_keys") or [])),
            user_data=data.get("user_data") or "",
        )


@dataclass(frozen=True)
class VmSpec:
    """One VM: identity, size, boot image, extra kernel arguments (kernel images only), NICs and seed.

    NIC ``i`` is the guest's ``eth<i>`` and the node's tap ``workers.net.names.tap_name(tag, uuid, i)``.
    """

    uuid: str
    name: str
    vcpus: int
    memory_mb: int
    disk_gb: int
    image: Image
    extra_kernel_args: tuple[str, ...] = field(default=())
    nics: tuple[NicSpec, ...] = field(default=())
    seed: SeedSpec | None = None

    def __post_init__(self) -> None:
        canonical = canonical_uuid(self.uuid)
        if canonical is None:
            raise InvalidSpec(f"uuid must be a UUID such as {uuid_module.uuid4()}, not {self.uuid!r}")
        object.__setattr__(self, "uuid", canonical)
        if not self.name or len(self.name) > 63:
            raise InvalidSpec("name must be 1 to 63 characters long")
        _require_range("vcpus", self.vcpus, 1, MAX_VCPUS)
        _require_range("memory_mb", self.memory_mb, 16, MAX_MEMORY_MB)
        _require_range("disk_gb", self.disk_gb, 1, MAX_DISK_GB)
        if self.extra_kernel_args and not isinstance(self.image, KernelImage):
            raise InvalidSpec("extra_kernel_args only apply to kernel images; this VM boots from a disk")
        for arg in self.extra_kernel_args:
            if not arg or any(ch.isspace() for ch in arg):
                raise InvalidSpec(f"each extra kernel argument must be one non-empty word, not {arg!r}")
        if len(self.nics) > MAX_NICS:
            raise InvalidSpec(f"a VM has at most {MAX_NICS} NICs, not {len(self.nics)}")
        macs = [nic.mac for nic in self.nics]
        if duplicates := sorted({mac for mac in macs if macs.count(mac) > 1}):
            raise InvalidSpec(f"each NIC needs its own MAC; repeated: {', '.join(duplicates)}")

    @property
    def kernel_cmdline(self) -> str:
        """The full kernel command line (image cmdline, then the extra arguments); empty for disks."""
        if not isinstance(self.image, KernelImage):
            return ""
        return " ".join(part for part in (self.image.cmdline, *self.extra_kernel_args) if part)

    def to_dict(self) -> VmDescription:
        """The contract/JSON form of this spec."""
        image: ImageDescription
        if isinstance(self.image, DiskImage):
            image = {"kind": "disk", "path": str(self.image.path), "format": self.image.format}
        else:
            image = {
                "kind": "kernel",
                "kernel_path": str(self.image.kernel_path),
                "initrd_path": str(self.image.initrd_path) if self.image.initrd_path else "",
                "cmdline": self.image.cmdline,
            }
        description: VmDescription = {
            "id": self.uuid,
            "name": self.name,
            "vcpus": self.vcpus,
            "memory_mb": self.memory_mb,
            "disk_gb": self.disk_gb,
            "image": image,
            "extra_kernel_args": list(self.extra_kernel_args),
            "nics": [nic.to_dict() for nic in self.nics],
        }
        if self.seed is not None:
            description["seed"] = self.seed.to_dict()
        return description

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VmSpec:
        """Parse the contract/JSON form; unknown image keys (``name``, ``checksum``) are ignored."""
        try:
            image_data = data["image"]
            if not isinstance(image_data, Mapping):
                raise InvalidSpec("image must be an object")
            kind = image_data.get("kind", "disk")
            image: Image
            if kind == "disk":
                image = DiskImage(Path(image_data["path"]), str(image_data.get("format") or "qcow2"))
            elif kind == "kernel":
                initrd = image_data.get("initrd_path") or None
                image = KernelImage(
                    Path(image_data["kernel_path"]),
                    Path(initrd) if initrd else None,
                    str(image_data.get("cmdline") or ""),
                )
            else:
                raise InvalidSpec(f"image.kind must be 'disk' or 'kernel', not {kind!r}")
            extra = data.get("extra_kernel_args") or ()
            if isinstance(extra, str):
                extra = extra.split()
            nics = []
            for nic in _as_list("nics", data.get("nics") or []):
                if not isinstance(nic, Mapping):
                    raise InvalidSpec(f"each NIC must be an object, not {nic!r}")
                nics.append(NicSpec.from_dict(nic))
            return cls(
                uuid=str(data["id"] if "id" in data else data["uuid"]),
                name=str(data["name"]),
                vcpus=_as_int("vcpus", data["vcpus"]),
                memory_mb=_as_int("memory_mb", data["memory_mb"]),
                disk_gb=_as_int("disk_gb", data["disk_gb"]),
                image=image,
                extra_kernel_args=tuple(str(arg) for arg in extra),
                nics=tuple(nics),
                seed=SeedSpec.from_dict(data["seed"]) if data.get("seed") is not None else None,
            )
        except KeyError as exc:
            raise InvalidSpec(f"VM spec is missing the key {exc.args[0]!r}") from exc


def _as_list(name: str, value: object) -> Sequence[Any]:
    if not isinstance(value, list | tuple):
        raise InvalidSpec(f"{name} must be a list, not {value!r}")
    return value


def _ipv4(name: str, value: object) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(value if isinstance(value, str) else "")
    except ValueError:
        raise InvalidSpec(f"{name} must be an IPv4 address such as 10.20.0.5, not {value!r}") from None


def _as_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidSpec(f"{name} must be an integer, not {value!r}")
    return value


def _require_range(name: str, value: int, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidSpec(f"{name} must be an integer from {low} to {high}, not {value!r}")


def _require_absolute(name: str, path: Path) -> None:
    if not path.is_absolute() or ".." in path.parts:
        raise InvalidSpec(f"{name} must be an absolute path without '..' components, not {str(path)!r}")
