"""File transfers end to end over real sockets on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from workers.dwcp import (
    DWCPServer,
    RedisProgressReporter,
    TransferCancelled,
    TransferControl,
    TransferError,
    TransferInterrupted,
    TransferRefused,
    send_file,
)
from workers.dwcp.transport import ConnectionPool

from .helpers import DEST, SECRET, SOURCE, FaultyProxy, MiB, random_file, sha256_of, write_mixed_file


def send(server: DWCPServer, ticket: Callable[..., str], path: Path, name: str, **options: object) -> object:
    return send_file(
        path,
        address=server.address_text,
        name=name,
        ticket=ticket(name),
        secret=SECRET,
        source_node=SOURCE,
        **options,  # type: ignore[arg-type]
    )


def wait_idle(server: DWCPServer) -> None:
    deadline = time.monotonic() + 10
    while server.active_transfers() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not server.active_transfers()


def test_a_mixed_file_arrives_identical_according_to_sha256sum(
    server: DWCPServer, root: Path, tmp_path: Path, ticket: Callable[..., str]
) -> None:
    source = write_mixed_file(tmp_path / "disk.img", 24 * MiB + 12345)
    result = send(server, ticket, source, "vms/1/disk.img")
    delivered = root / "vms/1/disk.img"
    reference = subprocess.run(
        ["sha256sum", str(source), str(delivered)], capture_output=True, text=True, check=True
    )
    digests = {line.split()[0] for line in reference.stdout.splitlines()}
    assert len(digests) == 1
    assert result.raw_bytes == source.stat().st_size  # type: ignore[attr-defined]
    assert result.wire_bytes < result.raw_bytes * 0.75  # type: ignore[attr-defined]
    assert {"zero", "raw"} <= set(result.codec_mix)  # type: ignore[attr-defined]
    assert not list(root.glob("vms/1/.*")), "no temporary files stay behind"


@pytest.mark.parametrize("codec", ["lz4", "zstd", "raw"])
def test_each_fixed_codec_delivers_the_file(
    server: DWCPServer, root: Path, tmp_path: Path, ticket: Callable[..., str], codec: str
) -> None:
    source = write_mixed_file(tmp_path / "disk.img", 6 * MiB)
    result = send(server, ticket, source, f"{codec}.img", codec=codec, streams=2)
    assert sha256_of(root / f"{codec}.img") == sha256_of(source)
    if codec != "raw":
        assert codec in result.codec_mix  # type: ignore[attr-defined]


def test_an_empty_file_is_delivered(
    server: DWCPServer, root: Path, tmp_path: Path, ticket: Callable[..., str]
) -> None:
    source = tmp_path / "empty"
    source.write_bytes(b"")
    send(server, ticket, source, "empty")
    assert (root / "empty").read_bytes() == b""


def test_a_sparse_file_travels_without_its_holes_and_stays_sparse(
    server: DWCPServer, root: Path, tmp_path: Path, ticket: Callable[..., str]
) -> None:
    source = tmp_path / "sparse.img"
    with source.open("wb") as handle:
        handle.truncate(256 * MiB)
        handle.seek(3 * MiB + 100)
        handle.write(os.urandom(2 * MiB))
        handle.seek(200 * MiB)
        handle.write(b"end of data")
    result = send(server, ticket, source, "sparse.img")
    delivered = root / "sparse.img"
    assert sha256_of(delivered) == sha256_of(source)
    assert result.wire_bytes < 5 * MiB  # type: ignore[attr-defined]
    assert delivered.stat().st_blocks * 512 < 16 * MiB


def test_a_transfer_cut_for_good_is_resumed_by_a_new_ticket_which_sends_only_the_rest(
    server: DWCPServer, root: Path, tmp_path: Path, ticket: Callable[..., str], pool: ConnectionPool
) -> None:
    source = random_file(tmp_path / "big.bin", 24 * MiB)
    proxy = FaultyProxy(server.address, cut_after=10 * MiB)  # cuts, then refuses every reconnect
    with pytest.raises(TransferInterrupted):
        send_file(
            source,
            address=proxy.address,
            name="big.bin",
            ticket=ticket("big.bin"),
            secret=SECRET,
            source_node=SOURCE,
            streams=2,
            pool=pool,
        )
    proxy.close()
    assert not (root / "big.bin").exists()
    # The receiver still keeps the cut session for a resume; the new ticket supersedes it at once.
    result = send(server, ticket, source, "big.bin", pool=pool)
    assert sha256_of(root / "big.bin") == sha256_of(source)
    assert result.resumed_bytes >= 4 * MiB  # type: ignore[attr-defined]
    assert result.wire_bytes <= 24 * MiB - result.resumed_bytes + MiB  # type: ignore[attr-defined]


def test_a_corrupted_chunk_fails_the_transfer_and_never_lands_under_the_final_name(
    server: DWCPServer, root: Path, tmp_path: Path, ticket: Callable[..., str], pool: ConnectionPool
) -> None:
    source = random_file(tmp_path / "data.bin", 8 * MiB)
    proxy = FaultyProxy(server.address, flip_at=3 * MiB + 4321)
    with pytest.raises(TransferError) as failed:
        send_file(
            source,
            address=proxy.address,
            name="data.bin",
            ticket=ticket("data.bin"),
            secret=SECRET,
            source_node=SOURCE,
            streams=1,
            codec="raw",
            pool=pool,
        )
    assert failed.value.code in {"checksum_mismatch", "interrupted"}
    proxy.close()
    wait_idle(server)
    assert not (root / "data.bin").exists()
    send(server, ticket, source, "data.bin", pool=pool)
    assert sha256_of(root / "data.bin") == sha256_of(source)


@pytest.mark.parametrize("name", ["../escape.bin", "/etc/evil", "a/../../escape.bin", "link/escape.bin"])
def test_targets_outside_the_root_are_refused(
    server: DWCPServer, root: Path, tmp_path: Path, ticket: Callable[..., str], name: str
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "link").symlink_to(outside)
    source = random_file(tmp_path / "payload", 100_000)
    with pytest.raises(TransferRefused) as refused:
        send(server, ticket, source, name)
    assert refused.value.code == "bad_target"
    assert not list(outside.iterdir())
    assert not (tmp_path / "escape.bin").exists()


def test_a_symlink_as_the_final_target_is_refused(
    server: DWCPServer, root: Path, tmp_path: Path, ticket: Callable[..., str]
) -> None:
    (root / "victim").symlink_to(tmp_path / "elsewhere")
    source = random_file(tmp_path / "payload", 1000)
    with pytest.raises(TransferRefused):
        send(server, ticket, source, "victim")
    assert not (tmp_path / "elsewhere").exists()


def test_refused_tickets_do_not_start_a_transfer(
    server: DWCPServer, root: Path, tmp_path: Path, ticket: Callable[..., str]
) -> None:
    source = random_file(tmp_path / "payload", 1000)
    cases = {
        "ticket_forged": ticket("x.bin", secret="not-the-fleet-secret-xyz"),
        "ticket_wrong_node": ticket("x.bin", dest_node="node-z"),
        "ticket_expired": ticket("x.bin", ttl_seconds=5, now=time.time() - 600),
        "wrong_target": ticket("x.bin"),  # the ticket names x.bin, the sender asks for y.bin below
        "wrong_source": ticket("x.bin", source_node="node-q"),
    }
    for code, token in cases.items():
        name = "y.bin" if code == "wrong_target" else "x.bin"
        with pytest.raises(TransferRefused) as refused:
            send_file(
                source,
                address=server.address_text,
                name=name,
                ticket=token,
                secret=SECRET,
                source_node=SOURCE,
            )
        assert refused.value.code == code
    token = ticket("x.bin")
    send_file(
        source, address=server.address_text, name="x.bin", ticket=token, secret=SECRET, source_node=SOURCE
    )
    with pytest.raises(TransferRefused) as replayed:
        send_file(
            source, address=server.address_text, name="x.bin", ticket=token, secret=SECRET, source_node=SOURCE
        )
    assert replayed.value.code == "ticket_replayed"
    assert not (root / "y.bin").exists()


def test_connections_are_reused_between_transfers(
    server: DWCPServer, root: Path, tmp_path: Path, ticket: Callable[..., str], pool: ConnectionPool
) -> None:
    source = random_file(tmp_path / "payload", 3 * MiB)
    for index in range(3):
        send(server, ticket, source, f"copy{index}", streams=3, pool=pool)
    assert server.connections_accepted == 3
    assert pool.connects == 3 and pool.reuses == 6


def test_chunks_of_a_named_base_image_are_sent_as_references(
    server: DWCPServer, root: Path, tmp_path: Path, ticket: Callable[..., str]
) -> None:
    base = random_file(root / "base.img", 16 * MiB)
    derived = bytearray(base.read_bytes())
    derived[5 * MiB : 6 * MiB] = os.urandom(MiB)  # the guest rewrote one MiB
    source = tmp_path / "overlay.img"
    source.write_bytes(bytes(derived))
    result = send(server, ticket, source, "vm.img", base="base.img")
    assert sha256_of(root / "vm.img") == sha256_of(source)
    assert result.codec_mix.get("ref", 0) == 15 * MiB  # type: ignore[attr-defined]
    assert result.wire_bytes < 2 * MiB  # type: ignore[attr-defined]
    cache = root / f".base.img.{MiB}.dwcp-index"
    assert cache.is_file()
    # The cached index is used next time, and thrown away once the base changes.
    again = send(server, ticket, source, "vm2.img", base="base.img")
    assert again.codec_mix.get("ref", 0) == 15 * MiB  # type: ignore[attr-defined]
    with base.open("r+b") as handle:
        handle.write(os.urandom(MiB))  # the first chunk of the base no longer matches
    changed = send(server, ticket, source, "vm3.img", base="base.img")
    assert changed.codec_mix.get("ref", 0) == 14 * MiB  # type: ignore[attr-defined]
    assert sha256_of(root / "vm3.img") == sha256_of(source)


def test_the_bandwidth_limit_is_honoured_and_can_change_while_running(
    server: DWCPServer, root: Path, tmp_path: Path, ticket: Callable[..., str]
) -> None:
    source = random_file(tmp_path / "payload", 6 * MiB)
    control = TransferControl(bandwidth_limit_mbps=80)  # 10 MB/s: 0.63 s for the whole file
    lowered = threading.Timer(0.2, control.set_bandwidth_limit, args=(16,))  # then 2 MB/s
    lowered.start()
    started = time.monotonic()
    send(server, ticket, source, "limited", codec="raw", streams=2, control=control)
    elapsed = time.monotonic() - started
    lowered.join()
    # Only lower bounds, which a loaded machine cannot break: by 0.2 s at most ~2 MB went out at the
    # first limit plus the two streams' chunks in flight (~2.1 MB), so the remaining >= 2.2 MB at the
    # lowered limit take >= 1.1 s more; at the first limit alone the whole file takes 0.63 s.
    assert elapsed > 1.0, f"{elapsed:.2f} s: the lowered limit did not apply while the transfer ran"
    assert sha256_of(root / "limited") == sha256_of(source)


def test_a_cancelled_transfer_leaves_nothing_behind(
    server: DWCPServer, root: Path, tmp_path: Path, ticket: Callable[..., str]
) -> None:
    source = random_file(tmp_path / "payload", 8 * MiB)
    control = TransferControl(bandwidth_limit_mbps=8)
    threading.Timer(0.5, control.cancel).start()
    with pytest.raises(TransferCancelled):
        send(server, ticket, source, "cancelled", codec="raw", control=control)
    wait_idle(server)
    assert not list(root.iterdir())


def test_progress_reaches_redis_as_a_hash_and_on_the_channel(
    server: DWCPServer, tmp_path: Path, ticket: Callable[..., str]
) -> None:
    client = redis.Redis(host="127.0.0.1", port=6379)
    prefix = f"test:dwcp:{os.getpid()}:{time.monotonic_ns()}:"
    reporter = RedisProgressReporter(client, key_prefix=prefix)
    token = ticket("watched.bin", transfer_id="watched-1")
    subscriber = client.pubsub()
    subscriber.subscribe(reporter.channel("watched-1"))
    subscriber.get_message(timeout=1)  # the subscribe confirmation
    source = random_file(tmp_path / "payload", 4 * MiB)
    control = TransferControl(bandwidth_limit_mbps=32)  # ~1 s, room for a few updates
    send_file(
        source,
        address=server.address_text,
        name="watched.bin",
        ticket=token,
        secret=SECRET,
        source_node=SOURCE,
        reporter=reporter,
        control=control,
    )
    messages = []
    while (message := subscriber.get_message(timeout=0.5)) is not None:
        messages.append(json.loads(message["data"]))
    stored = {
        key.decode(): value.decode() for key, value in client.hgetall(reporter.key("watched-1")).items()
    }
    client.delete(reporter.key("watched-1"))
    assert stored["phase"] == "done"
    assert int(stored["raw_bytes"]) == 4 * MiB
    assert int(stored["wire_bytes"]) >= 4 * MiB
    assert json.loads(stored["codec_mix"]) == {"raw": 4 * MiB}
    assert {"rate_bytes_per_second", "eta_seconds"} <= stored.keys()
    assert messages[-1]["phase"] == "done"
    duration = messages[-1]["elapsed_seconds"]
    assert 2 <= len(messages) <= duration * 5 + 2  # at most 5 updates a second, plus the final one


def test_a_source_modified_during_the_transfer_is_not_delivered(
    server: DWCPServer, root: Path, tmp_path: Path, ticket: Callable[..., str]
) -> None:
    source = random_file(tmp_path / "live.img", 4 * MiB)

    def scribble() -> None:
        with source.open("r+b") as handle:
            handle.seek(10)
            handle.write(b"the guest kept writing")

    threading.Timer(0.3, scribble).start()
    control = TransferControl(bandwidth_limit_mbps=40)  # ~0.9 s
    with pytest.raises(TransferError) as failed:
        send(server, ticket, source, "live.img", codec="raw", control=control)
    assert failed.value.code == "source_changed"
    wait_idle(server)
    assert not (root / "live.img").exists()


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("losetup"), reason="needs root and losetup")
def test_a_block_device_is_sent_by_its_real_size(
    server: DWCPServer, root: Path, tmp_path: Path, ticket: Callable[..., str]
) -> None:
    backing = write_mixed_file(tmp_path / "backing.img", 6 * MiB)
    attached = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True, text=True)
    if attached.returncode != 0:
        pytest.skip(f"no loop device available: {attached.stderr.strip()}")
    device = attached.stdout.strip()
    try:
        result = send(server, ticket, Path(device), "from-device.img")
    finally:
        subprocess.run(["losetup", "--detach", device], check=True)
    assert result.raw_bytes == 6 * MiB  # type: ignore[attr-defined]
    assert sha256_of(root / "from-device.img") == sha256_of(backing)


def test_a_transfer_resumes_on_a_restarted_server_from_its_journal(
    root: Path, tmp_path: Path, ticket: Callable[..., str], pool: ConnectionPool
) -> None:
    source = random_file(tmp_path / "big.bin", 16 * MiB)
    first = DWCPServer(listen="127.0.0.1:0", root=root, node_name=DEST, secret=SECRET).start()
    control = TransferControl(bandwidth_limit_mbps=64)  # ~8 MB/s: the stop lands mid-transfer
    threading.Timer(1.0, first.stop).start()
    with pytest.raises(TransferInterrupted):
        send_file(
            source,
            address=first.address_text,
            name="big.bin",
            ticket=ticket("big.bin"),
            secret=SECRET,
            source_node=SOURCE,
            codec="raw",
            control=control,
            pool=pool,
        )
    wait_idle(first)
    assert list(root.glob(".big.bin.dwcp-journal"))
    with DWCPServer(listen="127.0.0.1:0", root=root, node_name=DEST, secret=SECRET) as second:
        result = send(second, ticket, source, "big.bin", pool=pool)
    assert result.resumed_bytes >= 2 * MiB  # type: ignore[attr-defined]
    assert sha256_of(root / "big.bin") == sha256_of(source)
    assert not list(root.glob(".big.bin.*"))
