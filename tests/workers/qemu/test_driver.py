"""The driver against real QEMU running the test guest under TCG: lifecycle, idempotence, discovery."""

from __future__ import annotations

import os
import signal
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.workers.qemu.conftest import (
    last_tick,
    live_migrate,
    new_data_dir,
    qemu_processes_for,
    sweep,
    tcg_settings,
    wait_for_serial,
)
from workers.qemu import (
    InvalidSpec,
    KernelImage,
    NetworkSpec,
    NicSpec,
    NicsUnsupported,
    QemuDriver,
    QemuStartError,
    QmpCommandError,
    VmNotFound,
    VmNotRunning,
    VmSpec,
    VmState,
)
from workers.qemu.process import wait_gone

pytestmark = pytest.mark.qemu

SpecFactory = Callable[..., VmSpec]
NIC = NicSpec(
    "52:54:00:00:00:0a",
    "10.20.0.10",
    NetworkSpec(id="n1", name="blue", vni=100, cidr="10.20.0.0/24", gateway="10.20.0.1"),
)


@pytest.fixture(scope="module")
def booted(testguest: KernelImage) -> Iterator[tuple[QemuDriver, VmSpec]]:
    """One test guest booted to its first ticks, shared by the tests that leave it running."""
    spec = VmSpec(str(uuid.uuid4()), "shared", 1, 256, 1, testguest)
    data_dir = new_data_dir()
    driver = QemuDriver(tcg_settings(data_dir))
    try:
        driver.create(spec)
        started = time.monotonic()
        driver.start(spec.uuid)
        daemonized = time.monotonic() - started
        wait_for_serial(driver.paths(spec.uuid).guest_log, b"tick 1\r")
        print(f"\nstart returned after {daemonized:.2f} s; tick 1 after {time.monotonic() - started:.2f} s")
        yield driver, spec
    finally:
        driver.close()
        sweep(data_dir)


def test_a_started_vm_is_running_and_its_guest_channel_log_keeps_growing(booted):
    driver, spec = booted
    status = driver.status(spec.uuid)
    assert status.state is VmState.RUNNING
    assert status.qemu_status == "running"
    assert status.pid is not None
    log = driver.paths(spec.uuid).guest_log
    before_size, before_tick = log.stat().st_size, last_tick(log)
    time.sleep(0.6)
    assert log.stat().st_size > before_size
    assert last_tick(log) > before_tick


def test_the_qmp_sockets_run_dir_disk_console_and_guest_channel_are_private(booted):
    driver, spec = booted
    paths = driver.paths(spec.uuid)
    for socket_path in (paths.qmp_socket, paths.jobs_socket, paths.console_socket, paths.guest_socket):
        mode = os.stat(socket_path).st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600
    assert stat.S_IMODE(os.stat(paths.run_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(paths.disk).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(paths.serial_log).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(paths.guest_log).st_mode) == 0o600


def test_starting_a_running_vm_starts_no_second_qemu(booted):
    driver, spec = booted
    first_pid = driver.status(spec.uuid).pid
    again = driver.start(spec.uuid)
    assert again.state is VmState.RUNNING
    assert again.pid == first_pid
    assert qemu_processes_for(driver.paths(spec.uuid).qmp_socket) == [first_pid]


def test_creating_an_existing_vm_again_makes_no_second_disk(booted):
    driver, spec = booted
    disk = driver.paths(spec.uuid).disk
    before = disk.stat()
    status = driver.create(spec)
    assert status.state is VmState.RUNNING
    after = disk.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert sorted(p.name for p in disk.parent.iterdir()) == [disk.name]


def test_creating_an_existing_uuid_with_a_different_spec_is_refused(booted):
    driver, spec = booted
    with pytest.raises(InvalidSpec, match="different spec"):
        driver.create(VmSpec(spec.uuid, "other-name", spec.vcpus, spec.memory_mb, spec.disk_gb, spec.image))


def test_a_new_driver_instance_discovers_the_running_vm_and_talks_to_it(booted):
    driver, spec = booted
    pid = driver.status(spec.uuid).pid
    with QemuDriver(driver.settings) as restarted:
        found = {status.uuid: status for status in restarted.discover()}
        assert found.keys() == {spec.uuid}
        assert found[spec.uuid].state is VmState.RUNNING
        assert found[spec.uuid].pid == pid
        assert restarted.execute(spec.uuid, "query-name") == {"name": spec.name}


def test_a_refused_qmp_command_raises_with_the_qmp_error_class(booted):
    driver, spec = booted
    with pytest.raises(QmpCommandError) as raised:
        driver.execute(spec.uuid, "no-such-command")
    assert raised.value.error_class == "CommandNotFound"
    assert "no-such-command" in str(raised.value)


def test_a_job_session_sees_events_and_status_follows_pause_and_resume(booted):
    driver, spec = booted
    with driver.job_session(spec.uuid) as qmp:
        mark = qmp.event_mark()
        qmp.execute("stop")
        assert qmp.wait_event("STOP", after=mark, timeout=5).name == "STOP"
        paused = driver.status(spec.uuid)  # the lifecycle monitor is free while the job session is held
        assert (paused.state, paused.qemu_status) == (VmState.PAUSED, "paused")
        qmp.execute("cont")
        qmp.wait_event("RESUME", after=mark, timeout=5)
    assert driver.status(spec.uuid).state is VmState.RUNNING


def test_reboot_restarts_the_guest_in_the_same_qemu(booted):
    driver, spec = booted
    pid = driver.status(spec.uuid).pid
    log = driver.paths(spec.uuid).guest_log
    offset = log.stat().st_size
    assert driver.reboot(spec.uuid).pid == pid
    wait_for_serial(log, b"tick 0\r", offset=offset)
    assert driver.status(spec.uuid).pid == pid


def test_stop_falls_back_to_quit_when_the_guest_ignores_acpi_and_start_works_again(
    driver: QemuDriver, guest_spec: SpecFactory
):
    spec = guest_spec()
    driver.create(spec)
    pid = driver.start(spec.uuid).pid
    paths = driver.paths(spec.uuid)
    wait_for_serial(paths.guest_log, b"tick 1\r")
    started = time.monotonic()
    stopped = driver.stop(spec.uuid, powerdown_timeout=1.0)
    elapsed = time.monotonic() - started
    print(f"\nstop took {elapsed:.2f} s (1 s ACPI timeout, then quit)")
    assert stopped.state is VmState.STOPPED
    assert "ignored ACPI powerdown" in stopped.reason
    assert "quit" in stopped.reason
    assert any(line.startswith("testguest#") for line in stopped.serial_tail)  # the console: a shell prompt
    assert 1.0 <= elapsed < 10.0
    assert pid is not None and wait_gone(pid, str(paths.qmp_socket), 0)
    assert not paths.pidfile.exists()
    assert driver.stop(spec.uuid).state is VmState.STOPPED  # idempotent
    with pytest.raises(VmNotRunning):
        driver.reboot(spec.uuid)

    restarted = driver.start(spec.uuid)
    assert restarted.state is VmState.RUNNING
    assert restarted.pid != pid
    assert b"testguest# " in paths.previous_serial_log.read_bytes()  # the previous run's console is kept
    assert b"tick" in paths.previous_guest_log.read_bytes()  # and its guest channel


def test_a_qemu_killed_with_sigkill_is_reported_dead_with_its_last_serial_lines(
    driver: QemuDriver, guest_spec: SpecFactory
):
    spec = guest_spec()
    driver.create(spec)
    pid = driver.start(spec.uuid).pid
    assert pid is not None
    paths = driver.paths(spec.uuid)
    wait_for_serial(
        paths.serial_log, b"Booting from ROM"
    )  # firmware output is enough; no need to wait for Linux
    os.kill(pid, signal.SIGKILL)
    assert wait_gone(pid, str(paths.qmp_socket), 5)
    status = driver.status(spec.uuid)
    assert status.state is VmState.DEAD
    assert f"pid {pid}" in status.reason
    assert "killed or crashed" in status.reason
    assert any("Booting from ROM" in line for line in status.serial_tail)
    assert [s.state for s in driver.discover()] == [VmState.DEAD]
    assert status.to_dict()["state"] == "dead"


def test_concurrent_starts_of_one_vm_make_one_qemu(driver: QemuDriver, guest_spec: SpecFactory):
    spec = guest_spec()
    driver.create(spec)
    pids: list[int | None] = []
    threads = [threading.Thread(target=lambda: pids.append(driver.start(spec.uuid).pid)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(pids)) == 1
    assert qemu_processes_for(driver.paths(spec.uuid).qmp_socket) == pids[:1]


def test_delete_kills_qemu_removes_every_file_and_is_idempotent(driver: QemuDriver, guest_spec: SpecFactory):
    spec = guest_spec()
    driver.create(spec)
    pid = driver.start(spec.uuid).pid
    assert pid is not None
    paths = driver.paths(spec.uuid)
    driver.delete(spec.uuid)
    assert wait_gone(pid, str(paths.qmp_socket), 0)
    assert not paths.disk.exists()
    assert not paths.run_dir.exists()
    assert list(driver.layout.disks_dir.iterdir()) == []
    driver.delete(spec.uuid)  # deleting again is a no-op
    with pytest.raises(VmNotFound):
        driver.status(spec.uuid)
    assert driver.discover() == []


def test_a_kernel_qemu_cannot_load_is_a_clear_start_error(
    driver: QemuDriver, guest_spec: SpecFactory, testguest: KernelImage, tmp_path
):
    junk = tmp_path / "not-a-kernel"
    junk.write_bytes(b"\0" * 4096)
    spec = guest_spec(image=KernelImage(junk, testguest.initrd_path))
    driver.create(spec)
    with pytest.raises(QemuStartError, match=r"failed to start .*kernel too old") as raised:
        driver.start(spec.uuid)
    print(f"\n{raised.value}")
    assert driver.status(spec.uuid).state is VmState.STOPPED
    assert qemu_processes_for(driver.paths(spec.uuid).qmp_socket) == []


def test_a_qemu_terminated_by_a_signal_is_reported_with_qemus_own_message(
    driver: QemuDriver, guest_spec: SpecFactory
):
    spec = guest_spec()
    driver.create(spec)
    pid = driver.start(spec.uuid).pid
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    assert wait_gone(pid, str(driver.paths(spec.uuid).qmp_socket), 5)
    status = driver.status(spec.uuid)
    assert status.state is VmState.STOPPED  # QEMU shuts down cleanly on SIGTERM
    assert "terminating on signal 15" in status.reason
    assert any("terminating on signal 15" in line for line in status.qemu_messages)


def test_the_raw_qmp_helpers_live_migrate_a_ticking_guest_to_another_node(
    booted, driver: QemuDriver, guest_spec: SpecFactory
):
    # Runs last in this module: it leaves the shared guest's QEMU in "postmigrate".
    source_driver, source = booted  # the shared guest, in its own data dir: one node ...
    destination = guest_spec(name="destination")  # ... and this driver's data dir: another node
    driver.create(destination)
    incoming = driver.start(destination.uuid, incoming=True)
    assert (incoming.state, incoming.qemu_status) == (VmState.PAUSED, "inmigrate")
    source_log = source_driver.paths(source.uuid).guest_log
    live_migrate(source_driver, source.uuid, driver, destination.uuid)
    last_source_tick = last_tick(source_log)
    assert source_driver.status(source.uuid).qemu_status == "postmigrate"

    assert driver.status(destination.uuid).state is VmState.PAUSED  # -S: paused until told to continue
    driver.execute(destination.uuid, "cont")
    assert driver.status(destination.uuid).state is VmState.RUNNING
    destination_log = driver.paths(destination.uuid).guest_log
    wait_for_serial(destination_log, f"tick {last_source_tick + 2}\r".encode(), timeout=10)
    assert b"tick 0\r" not in destination_log.read_bytes()  # the guest kept counting: it did not reboot


def kernel_files(directory: Path) -> KernelImage:
    (directory / "vmlinux").write_bytes(b"not started")
    return KernelImage(directory / "vmlinux")


def test_a_driver_without_a_device_tag_refuses_to_create_a_vm_with_nics(driver: QemuDriver, tmp_path: Path):
    spec = VmSpec(str(uuid.uuid4()), "vm", 1, 128, 1, kernel_files(tmp_path), nics=(NIC,))
    with pytest.raises(NicsUnsupported, match="cannot attach NICs"):
        driver.create(spec)
    assert not driver.paths(spec.uuid).run_dir.exists()


def test_a_missing_tap_is_a_clear_error_before_qemu_starts(data_dir: Path, tmp_path: Path):
    spec = VmSpec(str(uuid.uuid4()), "vm", 1, 128, 1, kernel_files(tmp_path), nics=(NIC,))
    with QemuDriver(tcg_settings(data_dir), device_tag="beef") as tagged:
        tagged.create(spec)
        (tap,) = tagged.tap_names(spec)
        with pytest.raises(NicsUnsupported, match=f"the tap {tap} of NIC 0 .* does not exist"):
            tagged.start(spec.uuid)
        assert tagged.status(spec.uuid).state == VmState.STOPPED


def test_a_device_tag_must_look_like_a_node_tag(data_dir: Path):
    with pytest.raises(ValueError, match="four lower-case hex digits"):
        QemuDriver(tcg_settings(data_dir), device_tag="node1")
