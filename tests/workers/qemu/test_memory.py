"""The guest-RAM digest against a real paused test guest, and the q35 RAM layout it reads."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from workers.qemu import QemuDriver, QemuError, VmSpec
from workers.qemu.memory import CHUNK_SIZE, PMEMSAVE, PROCESS, MemoryDigest, memory_digest, q35_ram_ranges
from workers.qemu.qmp import QmpSession

from .conftest import wait_for_serial

MEMORY_MB = 128


@pytest.fixture
def paused(driver: QemuDriver, guest_spec: Callable[..., VmSpec]) -> Iterator[tuple[QmpSession, int]]:
    """A paused test guest's QMP session and QEMU process id."""
    spec = guest_spec(memory_mb=MEMORY_MB, uuid=str(uuid.uuid4()))
    driver.create(spec)
    driver.start(spec.uuid)
    wait_for_serial(driver.paths(spec.uuid).guest_log, b"tick 3\r")
    pid = driver.status(spec.uuid).pid
    assert pid is not None
    with driver.job_session(spec.uuid) as qmp:
        qmp.execute("stop")
        yield qmp, pid


def test_ram_ranges_follow_the_q35_split():
    assert q35_ram_ranges(128) == [(0, 128 << 20)]
    assert q35_ram_ranges(2815) == [(0, 2815 << 20)]
    assert q35_ram_ranges(2816) == [(0, 2 << 30), (4 << 30, (2816 << 20) - (2 << 30))]
    assert q35_ram_ranges(8192) == [(0, 2 << 30), (4 << 30, 6 << 30)]
    with pytest.raises(ValueError):
        q35_ram_ranges(0)


def test_a_paused_guest_has_one_digest_and_running_changes_it(paused, tmp_path: Path):
    qmp, pid = paused
    first = memory_digest(qmp, MEMORY_MB, pid=pid, scratch=tmp_path)
    assert first.method == PROCESS  # these tests run as root: QEMU's mapping is readable
    assert len(first.chunks) == (MEMORY_MB << 20) // CHUNK_SIZE
    assert first.differing(memory_digest(qmp, MEMORY_MB, pid=pid)) == 0
    qmp.execute("cont")
    time.sleep(1)  # the guest ticks and its kernel keeps time: its memory changes
    qmp.execute("stop")
    assert 0 < first.differing(memory_digest(qmp, MEMORY_MB, pid=pid)) < MEMORY_MB


def test_both_methods_read_the_same_ram(paused, tmp_path: Path):
    qmp, pid = paused
    direct = memory_digest(qmp, MEMORY_MB, pid=pid, method=PROCESS)
    through_qmp = memory_digest(qmp, MEMORY_MB, pid=pid, method=PMEMSAVE, scratch=tmp_path)
    assert through_qmp.method == PMEMSAVE
    assert direct.chunks == through_qmp.chunks
    assert list(tmp_path.iterdir()) == []  # the FIFO's directory is gone
    # Without a readable mapping the automatic choice falls back to QMP; a named method fails.
    assert memory_digest(qmp, MEMORY_MB, pid=None).method == PMEMSAVE
    with pytest.raises(QemuError, match="anonymous mappings"):
        memory_digest(qmp, MEMORY_MB + 1, pid=pid, method=PROCESS)
    with pytest.raises(ValueError):
        memory_digest(qmp, MEMORY_MB, method="telepathy")


def test_a_digest_survives_its_json_form_and_rejects_garbage():
    digest = MemoryDigest((0, 1, 2**64 - 1), PROCESS)
    assert MemoryDigest.from_json(digest.to_json()) == digest
    assert digest.differing(MemoryDigest((0, 1))) == 1  # a missing chunk counts as different
    for bad in (
        "x",
        ["0" * 16],
        {"method": "pmemsave"},
        {"method": "other", "chunks": []},
        {"method": "pmemsave", "chunks": [1, 2]},
        {"method": "pmemsave", "chunks": ["zz" * 8]},
    ):
        with pytest.raises(ValueError):
            MemoryDigest.from_json(bad)


def test_reading_a_quit_qemu_is_a_qemu_error(paused, tmp_path: Path):
    qmp, pid = paused
    qmp.execute("quit")
    time.sleep(0.5)
    for method in (PROCESS, PMEMSAVE):
        with pytest.raises(QemuError):
            memory_digest(qmp, MEMORY_MB, pid=pid, method=method, scratch=tmp_path)
