"""The VM's cloud-init NoCloud seed drive: a small ISO 9660 image with volume id ``cidata``.

It holds ``meta-data`` (instance-id = the VM's uuid, local-hostname, and the SSH keys as
``public-keys``, which cloud-init gives the image's default user), ``user-data`` (the user's text
verbatim, or an empty ``#cloud-config``) and ``network-config`` (version 2: one ethernet per NIC,
matched by MAC, named ``eth<i>`` in guest order, DHCP). DHCP rather than static addresses: the node's
dnsmasq already serves each NIC its address, gateway, DNS and MTU by a static lease, so the node's
network stays the one place that says them. meta-data and network-config are JSON, which YAML reads.

Invariants: the same spec gives the same bytes (every timestamp in the image is ``SEED_EPOCH``), so a
migration's destination rebuilds exactly the drive the guest saw; the file appears whole (written to
a temporary name, then renamed) with mode 0600; the user data never reaches a log or an exception.
"""

from __future__ import annotations

import io
import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from time import gmtime, struct_time
from types import ModuleType
from typing import Any

import pycdlib
import pycdlib.dates
import pycdlib.headervd
import pycdlib.pycdlib
import pycdlib.utils

from workers.qemu.spec import SeedSpec, VmSpec

VOLUME_ID = "cidata"
SEED_EPOCH = 1_700_000_000.0  # 2023-11-14T22:13:20Z, the fixed time of every date in a seed image
EMPTY_USER_DATA = "#cloud-config\n"
# ISO 9660 level-1 names, with the Rock Ridge and Joliet names cloud-init sees once Linux mounts it.
FILES = (("META_DAT.;1", "meta-data"), ("USER_DAT.;1", "user-data"), ("NETWORK_.;1", "network-config"))
# pycdlib reads the clock through these modules' ``time``; `_frozen_clock` swaps it while a seed is built.
_CLOCK_USERS: tuple[ModuleType, ...] = (pycdlib.dates, pycdlib.headervd, pycdlib.pycdlib, pycdlib.utils)
_clock_lock = threading.Lock()


class _FixedClock:
    """The ``time`` module as pycdlib sees it while a seed is built: always ``SEED_EPOCH``, in UTC."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def time() -> float:
        return SEED_EPOCH

    @staticmethod
    def localtime(seconds: float | None = None) -> struct_time:
        return gmtime(SEED_EPOCH if seconds is None else seconds)


@contextmanager
def _frozen_clock() -> Iterator[None]:
    with _clock_lock:
        originals = [module.time for module in _CLOCK_USERS]
        # setattr: mypy does not know these modules have a ``time`` attribute.
        for module in _CLOCK_USERS:
            setattr(module, "time", _FixedClock())  # noqa: B010
        try:
            yield
        finally:
            for module, original in zip(_CLOCK_USERS, originals, strict=True):
                setattr(module, "time", original)  # noqa: B010


def meta_data(spec: VmSpec, seed: SeedSpec) -> bytes:
    document: dict[str, object] = {"instance-id": spec.uuid, "local-hostname": seed.hostname}
    if seed.ssh_keys:
        document["public-keys"] = list(seed.ssh_keys)
    return _json(document)


def user_data(seed: SeedSpec) -> bytes:
    return (seed.user_data or EMPTY_USER_DATA).encode("utf-8", errors="replace")


def network_config(spec: VmSpec) -> bytes:
    ethernets = {
        f"eth{index}": {"match": {"macaddress": nic.mac}, "set-name": f"eth{index}", "dhcp4": True}
        for index, nic in enumerate(spec.nics)
    }
    return _json({"version": 2, "ethernets": ethernets})


def seed_files(spec: VmSpec) -> dict[str, bytes]:
    """The seed's files by name; the spec must have a seed."""
    if spec.seed is None:
        raise ValueError(f"VM {spec.uuid} has no seed")
    return {
        "meta-data": meta_data(spec, spec.seed),
        "user-data": user_data(spec.seed),
        "network-config": network_config(spec),
    }


def seed_image(spec: VmSpec) -> bytes:
    """The ISO 9660 image (Rock Ridge and Joliet names) of the spec's seed; the same spec, the same bytes."""
    files = seed_files(spec)
    iso = pycdlib.PyCdlib()
    out = io.BytesIO()
    with _frozen_clock():
        iso.new(interchange_level=1, joliet=3, rock_ridge="1.09", vol_ident=VOLUME_ID)
        for iso_name, name in FILES:
            data = files[name]
            iso.add_fp(io.BytesIO(data), len(data), f"/{iso_name}", rr_name=name, joliet_path=f"/{name}")
        iso.write_fp(out)
        iso.close()
    return out.getvalue()


def write_seed(spec: VmSpec, path: Path) -> None:
    """Write the spec's seed image to ``path`` (mode 0600), replacing any previous one whole."""
    image = seed_image(spec)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(image)
            file.flush()
            os.fsync(file.fileno())
        temporary.replace(path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _json(document: object) -> bytes:
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()
