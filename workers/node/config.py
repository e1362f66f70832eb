"""Node worker configuration: command-line flags with environment defaults, validated at start."""

import argparse
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from workers import contract
from workers.net.dataplane import parse_physical_networks
from workers.net.model import NetworkError
from workers.qemu import AcceleratorSetting

VERIFY_MEMORY_CHOICES = ("auto", "on", "off")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class ConfigError(Exception):
    """A setting a person must fix before the worker can start."""


@dataclass(frozen=True)
class NodeConfig:
    name: str
    data_dir: Path
    dwcp_host: str
    dwcp_port: int
    address: str
    redis_url: str
    dwcp_secret: str
    accelerator: AcceleratorSetting
    concurrency: int
    heartbeat_interval: float
    metrics_interval: float
    powerdown_timeout: float
    verify_memory: str = "auto"  # at a live migration's switch: on, off, or auto (on under TCG)
    vxlan_port: int = contract.VXLAN_PORT  # UDP port of this node's VXLAN devices
    physical_networks: Mapping[str, str] = field(default_factory=dict)  # provider network -> interface
    image_cache_gb: float = 50.0  # size limit of the stored images' cache (workers.node.images)
    link_outage_seconds: float = 120.0  # how long a DWCP tunnel or file whose link was cut tries to resume

    @property
    def dwcp_address(self) -> str:
        return f"{self.dwcp_host}:{self.dwcp_port}"

    @property
    def heartbeat_ttl(self) -> int:
        """Seconds a heartbeat stays in Redis: a few missed beats before it disappears."""
        return max(int(self.heartbeat_interval * 4), 5)


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--dwcp-listen must be HOST:PORT (e.g. 127.0.0.1:7001), not {value!r}")
    return host.strip("[]"), int(port)


def parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="python -m workers.node", description="Run a NovaCron node worker.")
    p.add_argument("--name", required=True, help="node name (its queue is node.<name>)")
    p.add_argument("--data-dir", required=True, type=Path, help="directory for disks and run files")
    p.add_argument("--dwcp-listen", required=True, help="HOST:PORT of this node's DWCP listener")
    p.add_argument(
        "--address",
        default=env("NODE_ADDRESS", ""),
        help="address other nodes reach (default: the DWCP host)",
    )
    p.add_argument(
        "--redis-url",
        default=env("REDIS_URL", "redis://127.0.0.1:6379/0"),
        help="broker and Redis (env REDIS_URL)",
    )
    p.add_argument(
        "--accelerator",
        default=env("NODE_ACCELERATOR", "auto"),
        choices=[setting.value for setting in AcceleratorSetting],
        help="kvm, tcg, or auto (a probe decides; env NODE_ACCELERATOR)",
    )
    p.add_argument(
        "--concurrency", type=int, default=int(env("NODE_CONCURRENCY", "4")), help="parallel node tasks"
    )
    p.add_argument("--heartbeat-interval", type=float, default=float(env("NODE_HEARTBEAT_INTERVAL", "3")))
    p.add_argument("--metrics-interval", type=float, default=float(env("NODE_METRICS_INTERVAL", "10")))
    p.add_argument(
        "--powerdown-timeout",
        type=float,
        default=float(env("NODE_POWERDOWN_TIMEOUT", "30")),
        help="seconds stop waits for the guest to act on ACPI powerdown before quitting QEMU",
    )
    p.add_argument(
        "--verify-memory",
        default=env("NODE_VERIFY_MEMORY", "auto"),
        choices=list(VERIFY_MEMORY_CHOICES),
        help="compare guest RAM on both nodes before a live-migrated guest resumes: on, off, or auto "
        "(on under TCG, where QEMU 7.2 was measured losing writes; env NODE_VERIFY_MEMORY)",
    )
    p.add_argument(
        "--vxlan-port",
        type=int,
        default=int(env("NODE_VXLAN_PORT", str(contract.VXLAN_PORT))),
        help="UDP port of this node's VXLAN devices; nodes sharing a network namespace need different "
        f"ones (env NODE_VXLAN_PORT, default {contract.VXLAN_PORT})",
    )
    p.add_argument(
        "--physical-networks",
        default=env("NODE_PHYSICAL_NETWORKS", ""),
        help="NAME=INTERFACE,...: the interface of this node bridged into each provider network of that "
        "physical network (env NODE_PHYSICAL_NETWORKS)",
    )
    p.add_argument(
        "--image-cache-gb",
        type=float,
        default=float(env("NODE_IMAGE_CACHE_GB", "50")),
        help="size limit of the cache of stored images; the least recently used image no VM uses is "
        "evicted when a new one makes it larger (env NODE_IMAGE_CACHE_GB, default 50)",
    )
    p.add_argument(
        "--link-outage-seconds",
        type=float,
        default=float(env("NODE_LINK_OUTAGE_SECONDS", "120")),
        help="how long a DWCP tunnel (a live migration's streams, a console) or file transfer (a cold "
        "migration's disk, an image push) whose link to the peer node was cut keeps reconnecting before "
        "it fails; QEMU does not see a shorter cut "
        "(env NODE_LINK_OUTAGE_SECONDS, default 120)",
    )
    return p


def from_args(argv: list[str] | None = None) -> NodeConfig:
    args = parser().parse_args(argv)
    if not NAME_PATTERN.match(args.name):
        raise ConfigError(f"--name {args.name!r}: use 1-63 letters, digits, dots, dashes or underscores")
    host, port = _host_port(args.dwcp_listen)
    if args.verify_memory not in VERIFY_MEMORY_CHOICES:  # an environment default skips argparse's check
        raise ConfigError(f"NODE_VERIFY_MEMORY must be one of auto, on, off; not {args.verify_memory!r}")
    if args.concurrency < 1:
        raise ConfigError("--concurrency must be at least 1")
    if args.heartbeat_interval <= 0 or args.metrics_interval <= 0:
        raise ConfigError("intervals must be positive")
    if not 0 < args.vxlan_port < 65536:
        raise ConfigError(f"--vxlan-port must be a UDP port (1-65535), not {args.vxlan_port}")
    try:
        physical_networks = parse_physical_networks(args.physical_networks)
    except NetworkError as exc:
        raise ConfigError(f"--physical-networks: {exc}") from None
    if args.image_cache_gb <= 0:
        raise ConfigError(f"--image-cache-gb must be positive, not {args.image_cache_gb}")
    if args.link_outage_seconds <= 0:
        raise ConfigError(f"--link-outage-seconds must be positive, not {args.link_outage_seconds}")
    secret = os.environ.get("DWCP_SECRET", "")
    if not secret:
        raise ConfigError(
            "DWCP_SECRET is not set: the node cannot authenticate transfers (use the control plane's)"
        )
    wildcard = host in ("0.0.0.0", "::")  # noqa: S104 - recognising a wildcard, not binding one
    address = args.address or (socket.getfqdn() if wildcard else host)
    return NodeConfig(
        name=args.name,
        data_dir=args.data_dir.resolve(),
        dwcp_host=host,
        dwcp_port=port,
        address=address,
        redis_url=args.redis_url,
        dwcp_secret=secret,
        accelerator=AcceleratorSetting(args.accelerator),
        concurrency=args.concurrency,
        heartbeat_interval=args.heartbeat_interval,
        metrics_interval=args.metrics_interval,
        powerdown_timeout=args.powerdown_timeout,
        verify_memory=args.verify_memory,
        vxlan_port=args.vxlan_port,
        physical_networks=physical_networks,
        image_cache_gb=args.image_cache_gb,
        link_outage_seconds=args.link_outage_seconds,
    )
