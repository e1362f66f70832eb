"""Node-level behaviour: facts for registration, clear errors for a bad install or data dir, disk creation."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest

from tests.workers.qemu.conftest import tcg_settings
from workers.qemu import (
    AcceleratorSetting,
    DataDirError,
    DiskImage,
    DriverSettings,
    InvalidSpec,
    KernelImage,
    QemuDriver,
    QemuError,
    QemuNotInstalled,
    VmSpec,
    VmState,
)


@pytest.mark.qemu
def test_node_facts_report_capacity_qemu_and_the_probe_verdict(driver: QemuDriver):
    auto = QemuDriver(
        DriverSettings(driver.layout.data_dir, accelerator=AcceleratorSetting.AUTO, probe_timeout=2)
    )
    try:
        facts = auto.node_facts()
    finally:
        auto.close()
    print(f"\n{facts}")
    assert facts["cpu_count"] >= 1
    assert facts["memory_mb"] > 0
    assert facts["disk_free_gb"] > 0
    assert facts["qemu_version"].split(".")[0].isdigit()
    assert facts["kvm_probe_reason"]
    assert facts["accelerator"] == ("kvm" if facts["kvm_usable"] else "tcg")


def test_a_missing_qemu_names_the_debian_package(data_dir: Path):
    with pytest.raises(QemuNotInstalled, match="apt-get install qemu-system-x86"):
        QemuDriver(DriverSettings(data_dir, qemu_system="qemu-system-x86_64-not-installed"))
    with pytest.raises(QemuNotInstalled, match="apt-get install qemu-utils"):
        QemuDriver(DriverSettings(data_dir, qemu_img="qemu-img-not-installed"))


def test_a_data_dir_that_cannot_be_created_is_a_clear_error(data_dir: Path):
    blocker = data_dir / "a-file"
    blocker.write_text("")
    with pytest.raises(DataDirError, match="is not writable"):
        QemuDriver(tcg_settings(blocker / "data"))


def test_a_data_dir_too_long_for_unix_sockets_is_refused(tmp_path: Path):
    with pytest.raises(DataDirError, match="too long"):
        QemuDriver(tcg_settings(tmp_path / ("x" * 80)))


def test_a_disk_image_vm_gets_a_qcow2_overlay_on_its_base(driver: QemuDriver, data_dir: Path):
    base = data_dir / "base.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(base), "2G"], check=True)
    spec = VmSpec(str(uuid.uuid4()), "overlay", 1, 128, 1, DiskImage(base, "raw"))
    status = driver.create(spec)
    assert (status.state, status.reason) == (VmState.STOPPED, "created, never started")
    info = driver.tools.img_info(driver.paths(spec.uuid).disk)
    assert info["format"] == "qcow2"
    assert info["backing-filename"] == str(base)
    assert info["backing-filename-format"] == "raw"
    assert info["virtual-size"] == 2 * 1024**3


def test_a_kernel_image_vm_gets_an_empty_disk_of_its_size(driver: QemuDriver, data_dir: Path):
    kernel = data_dir / "vmlinux"
    kernel.write_bytes(b"\0")
    spec = VmSpec(str(uuid.uuid4()), "empty-disk", 1, 128, 3, KernelImage(kernel))
    driver.create(spec)
    info = driver.tools.img_info(driver.paths(spec.uuid).disk)
    assert (info["format"], info["virtual-size"]) == ("qcow2", 3 * 1024**3)
    assert "backing-filename" not in info


def test_creating_from_a_missing_base_leaves_no_disk(driver: QemuDriver, data_dir: Path):
    spec = VmSpec(str(uuid.uuid4()), "no-base", 1, 128, 1, DiskImage(data_dir / "absent.qcow2"))
    with pytest.raises(InvalidSpec, match="does not exist on this node"):
        driver.create(spec)
    assert list(driver.layout.disks_dir.iterdir()) == []
    assert list(driver.layout.run_root.iterdir()) == []


@pytest.mark.parametrize("bad_uuid", ["../../etc", "", "not-a-uuid", "6f1c2a8e/../x"])
def test_operations_refuse_anything_but_a_uuid(driver: QemuDriver, bad_uuid: str):
    for operation in (driver.status, driver.start, driver.stop, driver.reboot, driver.delete):
        with pytest.raises(InvalidSpec, match="is not a VM uuid"):
            operation(bad_uuid)


def test_discover_skips_foreign_directories_and_interrupted_creates(driver: QemuDriver):
    (driver.layout.run_root / "not-a-vm").mkdir()
    (driver.layout.run_root / str(uuid.uuid4())).mkdir()  # a create that died before writing spec.json
    assert driver.discover() == []


def test_a_failed_create_keeps_files_it_did_not_make(driver: QemuDriver, data_dir: Path):
    spec = VmSpec(str(uuid.uuid4()), "received", 1, 128, 1, DiskImage(data_dir / "absent.qcow2"))
    paths = driver.paths(spec.uuid)
    paths.run_dir.mkdir(mode=0o700)
    marker = paths.run_dir / "migration.json"
    marker.write_text("{}")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(paths.disk), "1G"], check=True)
    with pytest.raises(InvalidSpec):
        driver.create(spec)
    assert marker.exists()
    assert paths.disk.exists()
    assert not paths.spec.exists()


def test_settings_accept_strings_from_the_environment_and_refuse_nonsense(data_dir: Path):
    settings = DriverSettings(str(data_dir), accelerator="tcg")  # type: ignore[arg-type]
    assert settings.accelerator is AcceleratorSetting.TCG
    assert settings.data_dir == data_dir
    with pytest.raises(QemuError, match="accelerator must be one of kvm, tcg, auto"):
        DriverSettings(data_dir, accelerator="hvf")  # type: ignore[arg-type]
    with pytest.raises(QemuError, match="powerdown_timeout must be"):
        DriverSettings(data_dir, powerdown_timeout=-1)
