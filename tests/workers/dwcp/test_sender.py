"""The sender's choices: large chunks for dense files, the fine grid otherwise; a queue bounded in bytes."""

from __future__ import annotations

import os
from pathlib import Path

from workers.dwcp import limits
from workers.dwcp.sender import default_chunk_size, queue_depth

from .helpers import MiB, random_file


def test_a_dense_file_sent_on_its_own_gets_the_large_grid(tmp_path: Path) -> None:
    source = random_file(tmp_path / "dense.bin", 3 * MiB)
    stat = source.stat()
    assert default_chunk_size(stat, stat.st_size, base=None) == limits.DENSE_FILE_CHUNK_SIZE


def test_a_transfer_against_a_base_keeps_the_fine_grid_for_its_references(tmp_path: Path) -> None:
    source = random_file(tmp_path / "overlay.bin", 3 * MiB)
    stat = source.stat()
    assert default_chunk_size(stat, stat.st_size, base="images/base.img") == limits.DEFAULT_CHUNK_SIZE


def test_a_sparse_file_keeps_the_fine_grid_so_its_holes_stay_holes(tmp_path: Path) -> None:
    source = tmp_path / "sparse.img"
    with source.open("wb") as handle:
        handle.write(os.urandom(MiB))
        handle.truncate(64 * MiB)
    stat = source.stat()
    assert default_chunk_size(stat, stat.st_size, base=None) == limits.DEFAULT_CHUNK_SIZE


def test_a_block_device_reporting_no_blocks_keeps_the_fine_grid() -> None:
    stat = os.stat("/dev/null")  # a character device: not a regular file, like a block device
    assert default_chunk_size(stat, 8 * MiB, base=None) == limits.DEFAULT_CHUNK_SIZE


def test_the_send_queue_holds_the_same_bytes_whatever_the_chunk_size() -> None:
    assert queue_depth(limits.DEFAULT_CHUNK_SIZE) == limits.SEND_QUEUE_DEPTH
    assert queue_depth(limits.DENSE_FILE_CHUNK_SIZE) * limits.DENSE_FILE_CHUNK_SIZE == limits.SEND_QUEUE_BYTES
    assert queue_depth(limits.MAX_CHUNK_SIZE) >= 2  # one per codec worker of a two-core node
