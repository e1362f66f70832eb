"""The guest-RAM digest against a real paused test guest, and the q35 RAM layout it reads."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from workers.qemu import QemuDriver, QemuError, VmSpec
from workers.qemu.memory import CHUNK_SIZE, MemoryDigest, memory_digest, q35_ram_ranges
from workers.qemu.qmp import QmpSession

from .conftest import wait_for_serial

MEMORY_MB = 128


@pytest.fixture
def paused(driver: QemuDriver, guest_spec: Callable[..., VmSpec]) -> Iterator[tuple[QmpSession, VmSpec]]:
    spec = guest_spec(memory_mb=MEMORY_MB, uuid=str(uuid.uuid4()))
    driver.create(spec)
    driver.start(spec.uuid)
    wait_for_serial(driver.paths(spec.uuid).serial_log, b"tick 3\r")
    with driver.job_session(spec.uuid) as qmp:
        qmp.execute("stop")
        yield qmp, spec


def test_ram_ranges_follow_the_q35_split():
    assert q35_ram_ranges(128) == [(0, 128 << 20)]
    assert q35_ram_ranges(2815) == [(0, 2815 << 20)]
    assert q35_ram_ranges(2816) == [(0, 2 << 30), (4 << 30, (2816 << 20) - (2 << 30))]
    assert q35_ram_ranges(8192) == [(0, 2 << 30), (4 << 30, 6 << 30)]
    with pytest.raises(ValueError):
        q35_ram_ranges(0)


def test_a_paused_guest_has_one_digest_and_running_changes_it(paused, tmp_path: Path):
    qmp, _ = paused
    first = memory_digest(qmp, MEMORY_MB, scratch=tmp_path)
    assert len(first.chunks) == (MEMORY_MB << 20) // CHUNK_SIZE
    assert first.differing(memory_digest(qmp, MEMORY_MB, scratch=tmp_path)) == 0
    assert list(tmp_path.iterdir()) == []  # the FIFO's directory is gone
    qmp.execute("cont")
    time.sleep(1)  # the guest ticks and its kernel keeps time: its memory changes
    qmp.execute("stop")
    assert 0 < first.differing(memory_digest(qmp, MEMORY_MB, scratch=tmp_path)) < MEMORY_MB


def test_a_digest_survives_its_json_form_and_rejects_garbage():
    digest = MemoryDigest((0, 1, 2**64 - 1))
    assert MemoryDigest.from_json(digest.to_json()) == digest
    assert digest.differing(MemoryDigest((0, 1))) == 1  # a missing chunk counts as different
    for bad in ("x", ["12"], [1, 2], None, ["zz" * 8]):
        with pytest.raises(ValueError):
            MemoryDigest.from_json(bad)


def test_reading_a_quit_qemu_is_a_qemu_error(paused, tmp_path: Path):
    qmp, _ = paused
    qmp.execute("quit")
    time.sleep(0.5)
    with pytest.raises(QemuError):
        memory_digest(qmp, MEMORY_MB, scratch=tmp_path)
