"""The sending side of a file transfer: ``send_file``.

Pipeline, bounded at every step so memory stays flat for any file size::

    producer thread --(futures, queue of SEND_QUEUE_DEPTH)--> one writer thread per stream
        |  submits read+encode jobs to the shared codec pool          | token bucket, send
        v                                                              v
    codec pool (pread, zero check, dedup key, lz4/zstd, xxh3)     N TCP streams --> receiver

One watcher thread per stream reads what the receiver sends back (RESULT, or ERROR at any time).
Writers time how long they starve for encoded chunks versus sit in ``send``; the adaptive codec
policy turns that into lighter or stronger compression. A cut connection raises
``TransferInterrupted``: calling ``send_file`` again with a new ticket resumes, because the receiver
reports the chunks it already holds and only the rest is sent.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from stat import S_ISBLK
from typing import Any

import xxhash

from . import codecs, files, limits
from .control import TransferControl
from .errors import (
    ProtocolError,
    RemoteProtocolError,
    TransferCancelled,
    TransferError,
    TransferInterrupted,
    TransferRefused,
)
from .files import INDEX_ENTRY, ChunkMap
from .frames import (
    HEADER_SIZE,
    Codec,
    ControlMessage,
    Flags,
    FrameType,
    control_frame,
    make_frame,
    parse_control,
)
from .progress import ProgressTracker, Reporter
from .protocol import Capability
from .tickets import peek_ticket, secret_bytes
from .transport import Channel, ConnectionPool, default_pool, parse_address

logger = logging.getLogger(__name__)

_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def codec_pool() -> ThreadPoolExecutor:
    """The process-wide pool that reads, hashes and compresses chunks (one worker per core)."""
    global _executor  # noqa: PLW0603 - one lazily created pool per process
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="dwcp-codec")
        return _executor


@dataclass(frozen=True, slots=True)
class TransferResult:
    transfer_id: str
    raw_bytes: int  # size of the file delivered
    wire_bytes: int  # bytes this attempt put on the wire, headers included
    seconds: float
    streams: int
    codec_mix: dict[str, int] = field(default_factory=dict)
    digest: str = ""
    resumed_bytes: int = 0  # already held by the receiver from an earlier attempt

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_STOP = object()


class _FileSend:
    def __init__(
        self,
        *,
        fd: int,
        size: int,
        chunk_size: int,
        held: ChunkMap,
        index: dict[bytes, int],
        policy: codecs.AdaptivePolicy,
        control: TransferControl,
        tracker: ProgressTracker,
    ) -> None:
        self.fd = fd
        self.size = size
        self.chunk_size = chunk_size
        self.held = held
        self.index = index
        self.policy = policy
        self.control = control
        self.tracker = tracker
        count = files.chunk_count(size, chunk_size)
        self.checksums = [codecs.zero_checksum(files.chunk_length(i, size, chunk_size)) for i in range(count)]
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=limits.SEND_QUEUE_DEPTH)
        self.stop = threading.Event()
        self.failure: BaseException | None = None
        self._failure_lock = threading.Lock()

    def fail(self, error: BaseException) -> None:
        with self._failure_lock:
            if self.failure is None:
                self.failure = error
        self.stop.set()

    # -- producer --------------------------------------------------------------------------------

    def encode_job(self, index: int, send: bool) -> tuple[int, codecs.EncodedChunk | None, int]:
        length = files.chunk_length(index, self.size, self.chunk_size)
        started = time.monotonic()
        data = os.pread(self.fd, length, index * self.chunk_size)
        self.policy.record_source(time.monotonic() - started)
        if len(data) != length:
            raise TransferError("source file shrank while being sent", code="source_changed")
        if not send:
            return index, None, xxhash.xxh3_64_intdigest(data)
        if self.index and not codecs.is_zero(data):
            base_offset = self.index.get(codecs.dedup_key(data))
            if base_offset is not None:
                chunk = codecs.reference(base_offset, data)
                return index, chunk, chunk.checksum
        chunk = codecs.encode(data, self.policy.level)
        return index, chunk, chunk.checksum

    def produce(self) -> None:
        pool = codec_pool()
        covered = 0
        try:
            for index in files.data_chunks(self.fd, self.size, self.chunk_size):
                if self.stop.is_set() or self.control.cancelled.is_set():
                    return
                future = pool.submit(self.encode_job, index, index not in self.held)
                self.queue.put(future)
                covered += files.chunk_length(index, self.size, self.chunk_size)
            # Holes are never read or sent: the receiver's part file starts out as one big hole.
            self.tracker.add(raw=self.size - covered, wire=0, codec="hole")
        except BaseException as exc:
            self.fail(exc)
        finally:
            self.queue.put(_STOP)

    # -- writers ---------------------------------------------------------------------------------

    def write(self, channel: Channel) -> None:
        while True:
            started = time.monotonic()
            item = self.queue.get()
            if item is _STOP:
                self.queue.put(_STOP)  # let the other writers see it too
                return
            future: Future[tuple[int, codecs.EncodedChunk | None, int]] = item
            if self.stop.is_set():
                future.cancel()
                continue
            try:
                index, chunk, checksum = future.result()
                ready = time.monotonic()
                self.checksums[index] = checksum
                if chunk is None:
                    continue
                frame = make_frame(
                    FrameType.DATA,
                    chunk.payload,
                    codec=chunk.codec,
                    flags=Flags.RESUMED if self.held.held else Flags.NONE,
                    seq_or_offset=index * self.chunk_size,
                    raw_length=chunk.raw_length,
                    checksum=chunk.checksum,
                )
                self.control.bucket.acquire(HEADER_SIZE + frame.wire_length)
                if self.control.cancelled.is_set():
                    self.stop.set()
                    continue
                wire = channel.send(frame)
                self.policy.record(
                    starved_seconds=ready - started,
                    backlogged=channel.unsent_bytes() > limits.LINK_BACKLOG_BYTES,
                )
                self.tracker.add(raw=chunk.raw_length, wire=wire, codec=chunk.codec.name.lower())
            except BaseException as exc:
                self.fail(exc)


class _Watcher:
    """Reads one channel until RESULT or ERROR; any other ending is an interruption."""

    def __init__(self, channel: Channel, transfer: _FileSend) -> None:
        self.channel = channel
        self.transfer = transfer
        self.result: dict[str, Any] | None = None
        self.thread = threading.Thread(target=self._run, name="dwcp-watch", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while True:
                try:
                    frame = self.channel.receive()
                except TimeoutError:
                    continue  # the receiver has nothing to say while data flows
                if frame is None:
                    raise TransferInterrupted("receiver closed the connection")
                if frame.type is FrameType.RESULT:
                    self.result = parse_control(frame).fields
                    return
                if frame.type is FrameType.ERROR:
                    message = parse_control(frame).fields
                    raise TransferError(
                        f"receiver failed the transfer: {message.get('message')}",
                        code=str(message.get("code", "remote_error")),
                    )
                raise RemoteProtocolError(f"unexpected {frame.type.name} from the receiver")
        except (ProtocolError, OSError) as exc:
            if not self.transfer.stop.is_set() or self.transfer.failure is None:
                self.transfer.fail(TransferInterrupted(f"connection to the receiver broke: {exc}"))
        except BaseException as exc:
            self.transfer.fail(exc)

    def wait(self) -> None:
        self.thread.join()


def _source_size(fd: int, stat: os.stat_result) -> int:
    """A block device reports st_size 0; its size is where its end is."""
    return os.lseek(fd, 0, os.SEEK_END) if S_ISBLK(stat.st_mode) else stat.st_size


def _source_id(path: Path, stat: os.stat_result, size: int) -> str:
    identity = f"{path.resolve()}|{size}|{stat.st_mtime_ns}|{stat.st_ino}|{stat.st_dev}|{stat.st_rdev}"
    return hashlib.sha256(identity.encode()).hexdigest()[:32]


def _refusal(frame_fields: dict[str, Any]) -> TransferRefused:
    return TransferRefused(
        f"receiver refused: {frame_fields.get('message', 'no reason given')}",
        code=str(frame_fields.get("code", "refused")),
    )


def negotiate(channel: Channel, frame_type: FrameType, message: dict[str, Any]) -> ControlMessage:
    """Send OPEN or ATTACH and return the ACCEPT/ATTACHED answer; a refusal raises ``TransferRefused``."""
    channel.send(control_frame(frame_type, message))
    reply = channel.receive()
    if reply is None:
        raise TransferInterrupted("receiver closed the connection")
    answer = parse_control(reply)
    if reply.type is FrameType.ERROR:
        raise _refusal(answer.fields)
    expected = FrameType.ACCEPT if frame_type is FrameType.OPEN else FrameType.ATTACHED
    if reply.type is not expected:
        raise RemoteProtocolError(f"expected {expected.name}, got {reply.type.name}")
    return answer


def _parse_index(payload: bytes | bytearray | memoryview) -> dict[bytes, int]:
    if len(payload) % INDEX_ENTRY.size:
        raise RemoteProtocolError("INDEX payload is not a whole number of entries")
    return {key: offset for key, offset in INDEX_ENTRY.iter_unpack(payload)}


def send_file(
    path: str | os.PathLike[str],
    *,
    address: str,
    name: str,
    ticket: str,
    secret: str | bytes,
    source_node: str,
    streams: int = limits.DEFAULT_STREAMS,
    codec: str = "auto",
    chunk_size: int = limits.DEFAULT_CHUNK_SIZE,
    base: str | None = None,
    control: TransferControl | None = None,
    reporter: Reporter | None = None,
    pool: ConnectionPool | None = None,
) -> TransferResult:
    """Send the file at ``path`` to the DWCP server at ``address`` (``HOST:PORT``) as ``name``.

    ``ticket`` must be a ticket for ``kind="file"`` and ``target=name``; ``base`` names a file
    under the receiver's root whose identical chunks are sent as references. Blocks until the
    receiver verified the whole-file digest and renamed the file into place. Raises
    ``TransferRefused``, ``TransferInterrupted`` (retry with a new ticket to resume),
    ``TransferCancelled`` or another ``TransferError``.
    """
    if not 1 <= streams <= limits.MAX_STREAMS:
        raise ValueError(f"streams must be in 1..{limits.MAX_STREAMS}")
    if chunk_size & (chunk_size - 1) or not limits.MIN_CHUNK_SIZE <= chunk_size <= limits.MAX_CHUNK_SIZE:
        raise ValueError("chunk_size must be a power of two within the protocol limits")
    key = secret_bytes(secret)
    mode = codecs.CodecMode(codec)
    control = control or TransferControl()
    pool = pool or default_pool()
    peer = parse_address(address)
    claims = peek_ticket(ticket)
    transfer_id = claims.transfer_id
    source = Path(path)
    fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    channels: list[Channel] = []
    started = time.monotonic()
    stat = os.fstat(fd)
    size = _source_size(fd, stat)
    tracker = ProgressTracker(transfer_id, total_bytes=size, reporter=reporter)
    phase = "failed"
    try:
        primary = pool.acquire(peer, key, claims.dest_node)
        channels.append(primary)
        accepted = negotiate(
            primary,
            FrameType.OPEN,
            {
                "ticket": ticket,
                "kind": "file",
                "target": name,
                "source_node": source_node,
                "streams": streams,
                "size": size,
                "chunk_size": chunk_size,
                "source_id": _source_id(source, stat, size),
                "base": base,
            },
        )
        session_key = accepted.text("session_key", max_length=64)
        count = files.chunk_count(size, chunk_size)
        held = ChunkMap.from_ranges(count, accepted.ranges("held", limit=count))
        granted = accepted.integer("streams", low=1, high=streams)
        index: dict[bytes, int] = {}
        if accepted.flag("index"):
            frame = primary.receive()
            if frame is None or frame.type is not FrameType.INDEX:
                raise RemoteProtocolError("expected the base INDEX frame")
            index = _parse_index(frame.payload)
        for stream in range(1, granted):
            channel = pool.acquire(peer, key, claims.dest_node)
            channels.append(channel)
            try:
                negotiate(
                    channel,
                    FrameType.ATTACH,
                    {"transfer_id": transfer_id, "session_key": session_key, "stream": stream},
                )
            except TransferRefused as exc:
                logger.warning("DWCP transfer %s continues with %d streams: %s", transfer_id, stream, exc)
                pool.release(channels.pop(), key)
                break
        caps = primary.protocol.capabilities
        # Files start at zstd-1: the sockets take the first ~0.5 s of a transfer before any backlog
        # shows, so a start at lz4 sent that much of every file at lz4's ratio. bench-dwcp, A/B in one
        # session, two runs each: VM disk over 1 Gbit 1.75/1.51 s -> 1.59/1.13 s, over 100 Mbit
        # 2.04/1.89 s -> 1.51/1.60 s; a CPU-bound loopback copy drops to lz4 or raw after a window.
        # Tunnels keep lz4: they carry latency-bound streams and run beside two busy QEMUs.
        policy = codecs.AdaptivePolicy(
            mode,
            writers=len(channels),
            allow_lz4=bool(caps & Capability.LZ4),
            allow_zstd=bool(caps & Capability.ZSTD),
            start=Codec.ZSTD,
        )
        resumed_bytes = sum(files.chunk_length(i, size, chunk_size) for i in range(count) if i in held)
        tracker.add(raw=resumed_bytes, wire=0, codec="held")
        tracker.phase = "transferring"
        transfer = _FileSend(
            fd=fd,
            size=size,
            chunk_size=chunk_size,
            held=held,
            index=index,
            policy=policy,
            control=control,
            tracker=tracker,
        )
        watchers = [_Watcher(channel, transfer) for channel in channels]
        writers = [
            threading.Thread(target=transfer.write, args=(channel,), name=f"dwcp-send-{i}", daemon=True)
            for i, channel in enumerate(channels)
        ]
        for writer in writers:
            writer.start()
        transfer.produce()
        for writer in writers:
            writer.join()
        if transfer.failure is None:
            for channel in channels[1:]:
                channel.send(control_frame(FrameType.END, {}))
            for watcher in watchers[1:]:
                watcher.wait()
        if transfer.failure is not None:
            raise transfer.failure
        if control.cancelled.is_set():
            primary.send(control_frame(FrameType.CANCEL, {}))
            watchers[0].wait()
            phase = "cancelled"
            raise TransferCancelled(f"transfer {transfer_id} cancelled")
        after = os.fstat(fd)
        if (_source_size(fd, after), after.st_mtime_ns) != (size, stat.st_mtime_ns):
            raise TransferError(f"{source} changed while it was being sent", code="source_changed")
        tracker.phase = "verifying"
        digest = files.file_digest(transfer.checksums)
        primary.send(control_frame(FrameType.END, {"digest": digest, "streams": len(channels)}))
        watchers[0].wait()
        if transfer.failure is not None:
            raise transfer.failure
        result = watchers[0].result or {}
        if not result.get("ok") or result.get("digest") != digest:
            raise TransferError(f"receiver did not confirm the digest: {result}", code="verification_failed")
        phase = "done"
        final = tracker.finish(phase)
        return TransferResult(
            transfer_id=transfer_id,
            raw_bytes=size,
            wire_bytes=final.wire_bytes,
            seconds=time.monotonic() - started,
            streams=len(channels),
            codec_mix=final.codec_mix,
            digest=digest,
            resumed_bytes=resumed_bytes,
        )
    except (ProtocolError, OSError) as exc:
        raise TransferInterrupted(f"transfer {transfer_id} interrupted: {exc}") from exc
    finally:
        os.close(fd)
        if phase != "done":
            tracker.finish(phase)
        for channel in channels:
            pool.release(channel, key)  # closes it unless it is idle and healthy
