"""Per-chunk codecs: zero elision, the incompressible fast path, lz4/zstd, and the adaptive policy."""

from __future__ import annotations

import os
import time

import pytest
import xxhash

from workers.dwcp import codecs
from workers.dwcp.codecs import LADDER, AdaptivePolicy, CodecMode, Level
from workers.dwcp.errors import ChecksumMismatch
from workers.dwcp.frames import Codec, FrameType, make_frame

CHUNK = 1024 * 1024
TEXT = (b"the quick brown fox jumps over the lazy dog; " * 30000)[:CHUNK]


def round_trip(data: bytes, level: Level) -> tuple[Codec, int]:
    chunk = codecs.encode(data, level)
    frame = make_frame(
        FrameType.DATA, chunk.payload, codec=chunk.codec, raw_length=chunk.raw_length, checksum=chunk.checksum
    )
    assert bytes(codecs.decode(frame)) == data
    return chunk.codec, len(chunk.payload)


@pytest.mark.parametrize("level", LADDER, ids=lambda level: level.label)
def test_every_level_round_trips_text_random_and_zeros(level: Level) -> None:
    assert round_trip(bytes(CHUNK), level) == (Codec.ZERO, 0)
    codec, wire = round_trip(os.urandom(CHUNK), level)
    assert (codec, wire) == (Codec.RAW, CHUNK)
    codec, wire = round_trip(TEXT, level)
    assert codec is level.codec
    assert wire < CHUNK // 10 or level.codec is Codec.RAW


def test_random_data_takes_the_fast_path_without_full_compression() -> None:
    assert codecs.looks_incompressible(os.urandom(CHUNK))
    assert not codecs.looks_incompressible(TEXT)


def test_a_chunk_that_barely_compresses_is_sent_raw() -> None:
    data = bytearray(os.urandom(CHUNK))
    data[: CHUNK // 50] = bytes(CHUNK // 50)  # 2 % zeros: compression would save too little
    assert codecs.encode(bytes(data), Level(Codec.ZSTD, 3)).codec is Codec.RAW


def test_a_corrupted_compressed_payload_is_detected() -> None:
    chunk = codecs.encode(TEXT, Level(Codec.LZ4))
    damaged = bytearray(chunk.payload)
    damaged[len(damaged) // 2] ^= 0x55
    frame = make_frame(
        FrameType.DATA, bytes(damaged), codec=Codec.LZ4, raw_length=chunk.raw_length, checksum=chunk.checksum
    )
    with pytest.raises(ChecksumMismatch):
        codecs.decode(frame)


def test_a_decompression_bomb_cannot_exceed_the_declared_size() -> None:
    bomb = codecs.encode(bytes([1]) * CHUNK, Level(Codec.ZSTD, 3))
    frame = make_frame(
        FrameType.DATA, bomb.payload, codec=Codec.ZSTD, raw_length=1000, checksum=bomb.checksum
    )
    with pytest.raises(ChecksumMismatch):
        codecs.decode(frame)


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_zero_detection_reads_every_byte_of_any_buffer(kind: type) -> None:
    assert codecs.is_zero(kind(bytes(CHUNK)))
    assert codecs.is_zero(kind(bytes(4096 + 7)))  # a file's tail
    for position in (0, CHUNK // 2, CHUNK - 1):
        data = bytearray(CHUNK)
        data[position] = 1
        assert not codecs.is_zero(kind(data))


def test_a_zero_frame_whose_checksum_is_not_that_of_zeros_is_refused() -> None:
    forged = make_frame(FrameType.DATA, b"", codec=Codec.ZERO, raw_length=CHUNK, checksum=12345)
    with pytest.raises(ChecksumMismatch):
        codecs.decode(forged)
    zeros = codecs.encode(bytes(CHUNK), Level(Codec.LZ4))
    assert zeros.checksum == xxhash.xxh3_64_intdigest(bytes(CHUNK))


def _settle(policy: AdaptivePolicy, *, starved: float, backlogged: bool) -> None:
    policy._window_start = time.monotonic() - 1  # a one-second window is over: decide now
    policy.record(starved_seconds=starved, backlogged=backlogged)


def warmed_up(policy: AdaptivePolicy) -> AdaptivePolicy:
    _settle(policy, starved=1.0, backlogged=False)  # the fill-up window: must not count
    return policy


def test_starving_in_the_first_window_is_the_pipeline_filling_up_not_a_slow_cpu() -> None:
    policy = AdaptivePolicy()
    _settle(policy, starved=1.0, backlogged=False)
    assert policy.level.codec is Codec.LZ4


def test_a_backlog_in_the_first_window_already_counts() -> None:
    policy = AdaptivePolicy()
    _settle(policy, starved=0.0, backlogged=True)
    assert policy.level == Level(Codec.ZSTD, 1)


def test_the_policy_gets_stronger_when_the_link_is_the_bottleneck() -> None:
    policy = warmed_up(AdaptivePolicy())
    assert policy.level.codec is Codec.LZ4
    _settle(policy, starved=0.0, backlogged=True)
    assert policy.level == Level(Codec.ZSTD, 1)
    _settle(policy, starved=0.9, backlogged=True)  # writers also wait, but bytes still pile up
    assert policy.level == Level(Codec.ZSTD, 3)


def test_the_policy_gets_lighter_when_the_cpu_is_the_bottleneck() -> None:
    policy = warmed_up(AdaptivePolicy())
    _settle(policy, starved=0.8, backlogged=False)
    assert policy.level.codec is Codec.RAW
    _settle(policy, starved=0.8, backlogged=False)
    assert policy.level.codec is Codec.RAW


def test_the_policy_does_not_blame_the_cpu_for_a_slow_disk() -> None:
    policy = warmed_up(AdaptivePolicy())
    policy.record_source(10.0)  # codec workers spent the window waiting for reads
    _settle(policy, starved=0.9, backlogged=False)
    assert policy.level.codec is Codec.LZ4


def test_the_policy_holds_when_neither_side_is_clearly_the_bottleneck() -> None:
    policy = warmed_up(AdaptivePolicy())
    _settle(policy, starved=0.2, backlogged=False)
    assert policy.level.codec is Codec.LZ4


def test_an_automatic_policy_starts_where_asked_and_falls_back_to_lz4() -> None:
    assert AdaptivePolicy(start=Codec.ZSTD).level == Level(Codec.ZSTD, 1)
    assert AdaptivePolicy(start=Codec.ZSTD, allow_zstd=False).level == Level(Codec.LZ4)
    assert AdaptivePolicy(start=Codec.ZSTD, allow_zstd=False, allow_lz4=False).level == Level(Codec.RAW)
    assert AdaptivePolicy().level == Level(Codec.LZ4)  # tunnels


def test_fixed_modes_never_move_and_respect_peer_capabilities() -> None:
    policy = warmed_up(AdaptivePolicy(CodecMode.ZSTD))
    _settle(policy, starved=1.0, backlogged=False)
    assert policy.level.codec is Codec.ZSTD
    with pytest.raises(ValueError):
        AdaptivePolicy(CodecMode.ZSTD, allow_zstd=False)
    assert all(level.codec is not Codec.ZSTD for level in AdaptivePolicy(allow_zstd=False)._ladder)
