"""The cloud-init NoCloud seed: its files read back with pycdlib, its limits, and real QEMU with the drive."""

from __future__ import annotations

import io
import json
import stat
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pycdlib
import pytest

from tests.workers.qemu.conftest import live_migrate, new_data_dir, sweep, tcg_settings, wait_for_serial
from workers.qemu import InvalidSpec, KernelImage, NetworkSpec, NicSpec, QemuDriver, VmSpec, VmState
from workers.qemu.seed import seed_image, write_seed
from workers.qemu.spec import MAX_USER_DATA_BYTES, SeedSpec

SpecFactory = Callable[..., VmSpec]
NETWORK = NetworkSpec(id="n1", name="blue", vni=100, cidr="10.20.0.0/24", gateway="10.20.0.1")
NICS = (
    NicSpec("52:54:00:00:00:0a", "10.20.0.10", NETWORK),
    NicSpec("52:54:00:00:00:0b", "10.20.0.11", NETWORK),
)
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDkey user@example"
USER_DATA = "#cloud-config\nruncmd:\n  - [touch, /secret-marker]\n"


def spec_with(tmp_path: Path, seed: SeedSpec | None, nics: tuple[NicSpec, ...] = NICS) -> VmSpec:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"")
    return VmSpec(str(uuid.uuid4()), "seeded", 1, 128, 1, KernelImage(kernel), nics=nics, seed=seed)


def read_back(image: bytes) -> tuple[str, dict[str, bytes]]:
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(image))
    files: dict[str, bytes] = {}
    for name in ("meta-data", "user-data", "network-config"):
        for facade in ({"rr_path": f"/{name}"}, {"joliet_path": f"/{name}"}):
            out = io.BytesIO()
            iso.get_file_from_iso_fp(out, **facade)
            files.setdefault(name, out.getvalue())
            assert out.getvalue() == files[name]  # Rock Ridge and Joliet name the same file
    volume = iso.pvd.volume_identifier.decode().strip()
    iso.close()
    return volume, files


def test_the_seed_holds_meta_data_user_data_and_network_config_exactly(tmp_path: Path):
    spec = spec_with(tmp_path, SeedSpec("web-1.example", (KEY,), USER_DATA))
    volume, files = read_back(seed_image(spec))
    assert volume == "cidata"
    assert json.loads(files["meta-data"]) == {
        "instance-id": spec.uuid,
        "local-hostname": "web-1.example",
        "public-keys": [KEY],
    }
    assert files["user-data"] == USER_DATA.encode()
    assert json.loads(files["network-config"]) == {
        "version": 2,
        "ethernets": {
            "eth0": {"match": {"macaddress": "52:54:00:00:00:0a"}, "set-name": "eth0", "dhcp4": True},
            "eth1": {"match": {"macaddress": "52:54:00:00:00:0b"}, "set-name": "eth1", "dhcp4": True},
        },
    }


def test_empty_user_data_is_an_empty_cloud_config_and_no_keys_no_public_keys(tmp_path: Path):
    spec = spec_with(tmp_path, SeedSpec("db"), nics=())
    _, files = read_back(seed_image(spec))
    assert files["user-data"] == b"#cloud-config\n"
    assert json.loads(files["meta-data"]) == {"instance-id": spec.uuid, "local-hostname": "db"}
    assert json.loads(files["network-config"]) == {"version": 2, "ethernets": {}}


def test_the_same_spec_gives_the_same_bytes_at_another_time(tmp_path: Path):
    spec = spec_with(tmp_path, SeedSpec("web-1", (KEY,), USER_DATA))
    first = seed_image(spec)
    time.sleep(1.1)  # ISO 9660 dates have one-second resolution
    rebuilt = VmSpec.from_dict(json.loads(json.dumps(spec.to_dict())))  # as a destination receives it
    assert seed_image(rebuilt) == first
    other = spec_with(tmp_path, SeedSpec("web-2", (KEY,), USER_DATA))
    assert seed_image(other) != first


def test_the_seed_file_is_private_and_written_whole(tmp_path: Path):
    spec = spec_with(tmp_path, SeedSpec("web-1", (KEY,), USER_DATA))
    path = tmp_path / "seed.iso"
    path.write_bytes(b"an older seed")
    write_seed(spec, path)
    assert path.read_bytes() == seed_image(spec)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seed.iso", "vmlinux"]  # no temporary left


@pytest.mark.parametrize(
    "hostname",
    [
        "",
        "-web",
        "web-",
        "web_1",
        "a" * 64,
        "web..example",
        "web.",
        "x" * 63 + "." + "y" * 63 + ".z" * 64,
        "wéb",
    ],
)
def test_a_hostname_that_is_not_rfc_1123_is_refused(hostname: str):
    with pytest.raises(InvalidSpec, match=r"seed\.hostname must be an RFC 1123 host name"):
        SeedSpec(hostname)


def test_rfc_1123_hostnames_are_accepted():
    for hostname in ("web-1", "1st", "A" * 63, "web-1.eu-west.example.com"):
        assert SeedSpec(hostname).hostname == hostname


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (("ssh-ed25519",), r"seed.ssh_keys\[0\] must be one OpenSSH public key line"),
        ((KEY, KEY + "\nssh-rsa AAAA injected"), r"seed.ssh_keys\[1\] must be one OpenSSH public key line"),
        ((KEY,) * 33, "seed.ssh_keys holds at most 32 keys"),
        (("ssh-rsa " + "A" * 17000,), r"seed.ssh_keys\[0\] is longer than 16384 bytes"),
    ],
)
def test_malformed_or_too_many_ssh_keys_are_refused(keys: tuple[str, ...], message: str):
    with pytest.raises(InvalidSpec, match=message):
        SeedSpec("web", keys)


def test_oversize_user_data_is_refused_without_showing_it():
    secret = "#cloud-config\n# password: hunter2\n" + "x" * MAX_USER_DATA_BYTES
    with pytest.raises(InvalidSpec, match=f"seed.user_data is {len(secret)} bytes; the limit is") as refused:
        SeedSpec("web", (), secret)
    assert "hunter2" not in str(refused.value)
    assert "hunter2" not in repr(SeedSpec("web", (), "#cloud-config\n# password: hunter2\n"))


def test_a_seed_in_the_contract_form_round_trips_and_a_bad_one_is_refused(tmp_path: Path):
    spec = spec_with(tmp_path, SeedSpec("web", (KEY,), USER_DATA))
    description = spec.to_dict()
    assert description["seed"] == {"hostname": "web", "ssh_keys": [KEY], "user_data": USER_DATA}
    assert VmSpec.from_dict(description) == spec
    assert "seed" not in spec_with(tmp_path, None).to_dict()
    with pytest.raises(InvalidSpec, match=r"seed\.hostname must be a string"):
        VmSpec.from_dict({**description, "seed": {"ssh_keys": [], "user_data": ""}})


def started_with_seed(driver: QemuDriver, guest_spec: SpecFactory) -> VmSpec:
    """A test guest with a seed, created, started and ticking on ``driver``."""
    spec = guest_spec(seed=SeedSpec("web-1", (KEY,), USER_DATA))
    driver.create(spec)
    driver.start(spec.uuid)
    wait_for_serial(driver.paths(spec.uuid).guest_log, b"tick 1\r", timeout=60)
    return spec


@pytest.mark.qemu
def test_qemu_gets_the_seed_as_a_read_only_cdrom_rebuilt_at_start_and_deleted_with_the_vm(
    driver: QemuDriver, guest_spec: SpecFactory
):
    spec = started_with_seed(driver, guest_spec)
    paths = driver.paths(spec.uuid)
    assert paths.seed.read_bytes() == seed_image(spec)
    assert stat.S_IMODE(paths.spec.stat().st_mode) == 0o600  # it holds the user data too
    devices = {
        device["device"] or device["qdev"]: device for device in driver.execute(spec.uuid, "query-block")
    }
    cdrom = next(device for device in devices.values() if device.get("removable"))
    assert cdrom["inserted"]["ro"] is True
    assert cdrom["inserted"]["file"] == str(paths.seed)
    assert cdrom["inserted"]["node-name"] == "seed0"
    assert cdrom["qdev"].endswith("cd-seed0")

    driver.stop(spec.uuid, powerdown_timeout=0)
    paths.seed.unlink()
    assert driver.start(spec.uuid).state is VmState.RUNNING
    assert paths.seed.read_bytes() == seed_image(spec)
    driver.delete(spec.uuid)
    assert not paths.seed.exists()


@pytest.mark.qemu
def test_a_seeded_guest_live_migrates_with_its_cdrom_rebuilt_on_the_destination(
    driver: QemuDriver, guest_spec: SpecFactory
):
    spec = started_with_seed(driver, guest_spec)
    other_dir = new_data_dir()
    try:
        with QemuDriver(tcg_settings(other_dir)) as destination:
            destination.create(spec)
            destination.start(spec.uuid, incoming=True)
            assert destination.paths(spec.uuid).seed.read_bytes() == driver.paths(spec.uuid).seed.read_bytes()
            live_migrate(driver, spec.uuid, destination, spec.uuid)
            destination.execute(spec.uuid, "cont")
            assert destination.status(spec.uuid).state is VmState.RUNNING
            cdroms = [d for d in destination.execute(spec.uuid, "query-block") if d.get("removable")]
            assert [d["inserted"]["file"] for d in cdroms] == [str(destination.paths(spec.uuid).seed)]
    finally:
        sweep(other_dir)
