"""The sending side of a file transfer: ``send_file``.

Pipeline, bounded at every step so memory stays flat for any file size::

    producer thread --(futures, queue of SEND_QUEUE_DEPTH)--> one writer thread per stream
        |  submits read+encode jobs to the shared codec pool          | token bucket, send
        v                                                              v
    codec pool (pread, zero check, dedup key, lz4/zstd, xxh3)     N TCP streams --> receiver

One watcher thread per stream reads what the receiver sends back (RESULT, or ERROR at any time;
ACKs as keepalives, ``keepalive``). Writers time how long they starve for encoded chunks versus sit
in ``send``; the adaptive codec policy turns that into lighter or stronger compression.

A cut link (a connection broken, or silent for ``TUNNEL_LINK_SILENCE_SECONDS``) ends the pass, not
the transfer: the sender reconnects and sends RESUME on each stream with the session key the
receiver handed out at ACCEPT (the single-use ticket is not shown again), the receiver answers with
the chunks it holds, and the next pass sends only the others, for up to ``link_outage_seconds``.
Past that, ``TransferInterrupted``: a later ``send_file`` with a new ticket still resumes from the
receiver's journal.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import socket
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
    ConnectionLost,
    LocalProtocolError,
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
from .keepalive import LinkWatch
from .progress import ProgressTracker, Reporter
from .protocol import Capability
from .tickets import peek_ticket, secret_bytes
from .transport import Address, Channel, ConnectionPool, default_pool, parse_address, reconnect_backoff

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
    bytes_resent: int = 0  # raw bytes sent again after a cut (in flight when it came, not held)
    outages: list[float] = field(default_factory=list)  # seconds each cut this transfer survived lasted

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_STOP = object()


class _LinkCut(Exception):
    """The connections of one pass broke or went silent: reconnect and resume (not a failure)."""


class _FileSend:
    """One file's sending pipeline, across the passes of its transfer: a pass runs on one generation
    of streams; after a cut the next pass sends only the chunks the receiver does not hold. What is
    known across passes: each chunk's checksum (read once), which chunks went on the wire (a second
    time is counted as resent, not as progress)."""

    def __init__(
        self,
        *,
        fd: int,
        size: int,
        chunk_size: int,
        index: dict[bytes, int],
        policy: codecs.AdaptivePolicy,
        control: TransferControl,
        tracker: ProgressTracker,
    ) -> None:
        self.fd = fd
        self.size = size
        self.chunk_size = chunk_size
        self.index = index
        self.policy = policy
        self.control = control
        self.tracker = tracker
        count = files.chunk_count(size, chunk_size)
        self.checksums = [codecs.zero_checksum(files.chunk_length(i, size, chunk_size)) for i in range(count)]
        self._maps_lock = threading.Lock()
        self.hashed = ChunkMap(count)  # chunks whose checksum is in ``checksums``
        self.sent = ChunkMap(count)  # chunks put on the wire by any pass
        self.bytes_resent = 0  # raw bytes of chunks sent again after a cut (lost in flight)
        self.passes = 0
        self.held = ChunkMap(count)
        self.channels: list[Channel] = []
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=limits.SEND_QUEUE_DEPTH)
        self.stop = threading.Event()
        self.failure: BaseException | None = None
        self.cut_reason: str | None = None
        self._failure_lock = threading.Lock()

    def begin(self, held: ChunkMap, channels: list[Channel]) -> None:
        """Start a pass on ``channels``; the receiver holds ``held``."""
        self.held = held
        self.channels = list(channels)
        self.queue = queue.Queue(maxsize=limits.SEND_QUEUE_DEPTH)
        self.stop = threading.Event()
        self.failure = None
        self.cut_reason = None
        self.passes += 1

    def fail(self, error: BaseException) -> None:
        with self._failure_lock:
            if self.failure is None:
                self.failure = error
        self.stop.set()

    def cut(self, reason: str) -> None:
        """A connection of this pass broke: end the pass on all of them (the sender resumes)."""
        with self._failure_lock:
            if self.cut_reason is None:
                self.cut_reason = reason
        self.stop.set()
        for channel in self.channels:
            with contextlib.suppress(OSError):
                channel.sock.shutdown(socket.SHUT_RDWR)  # wakes writers and watchers blocked on it

    def check(self) -> None:
        """Raise how the pass ended badly: a failure (fatal) before a cut (resumed)."""
        if self.failure is not None:
            raise self.failure
        if self.cut_reason is not None:
            raise _LinkCut(self.cut_reason)

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
                covered += files.chunk_length(index, self.size, self.chunk_size)
                send = index not in self.held
                with self._maps_lock:
                    known = index in self.hashed
                if not send and known:
                    continue  # held, and its checksum read in an earlier pass
                self.queue.put(pool.submit(self.encode_job, index, send))
            if self.passes == 1:
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
                with self._maps_lock:
                    self.hashed.add(index)
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
                try:
                    wire = channel.send(frame)
                except (OSError, ProtocolError) as exc:  # broken, or closed by its watcher's EOF
                    self.cut(f"sending failed: {exc}")
                    continue
                with self._maps_lock:
                    resend = index in self.sent
                    self.sent.add(index)
                    if resend:
                        self.bytes_resent += chunk.raw_length
                if resend:  # progress counted it the first time
                    self.tracker.add(raw=0, wire=wire)
                    continue
                self.policy.record(
                    starved_seconds=ready - started,
                    backlogged=channel.unsent_bytes() > limits.LINK_BACKLOG_BYTES,
                )
                self.tracker.add(raw=chunk.raw_length, wire=wire, codec=chunk.codec.name.lower())
            except BaseException as exc:
                self.fail(exc)


class _Watcher:
    """Reads one channel until RESULT or ERROR (ACKs are the receiver's keepalives); a connection
    that breaks or goes silent cuts the pass."""

    def __init__(self, channel: Channel, transfer: _FileSend, watch: LinkWatch) -> None:
        self.channel = channel
        self.transfer = transfer
        self.watch = watch
        self.result: dict[str, Any] | None = None
        self.thread = threading.Thread(target=self._run, name="dwcp-watch", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while True:
                try:
                    frame = self.watch.receive(self.channel)
                except TimeoutError:
                    continue  # the watch notices a silent link long before this
                if frame is None:
                    raise ConnectionLost("receiver closed the connection")
                if frame.type is FrameType.ACK:
                    continue
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
        except (ConnectionLost, LocalProtocolError, OSError) as exc:  # local: closed by a writer's cut
            self.transfer.cut(f"connection to the receiver broke: {exc}")
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


@dataclass
class _Link:
    """Where a transfer's streams go and how they are proven: the OPEN's ticket, then the session key."""

    peer: Address
    key: bytes
    dest_node: str
    transfer_id: str
    pool: ConnectionPool
    session_key: str = ""
    granted: int = 1

    def connect(self, timeout: float = limits.HANDSHAKE_TIMEOUT_SECONDS) -> Channel:
        return self.pool.acquire(self.peer, self.key, self.dest_node, timeout=timeout)

    def join(self, channels: list[Channel], frame_type: FrameType, *, timeout: float) -> None:
        """ATTACH (or RESUME) streams 1.. onto ``channels``; a refused one leaves the transfer with fewer."""
        for stream in range(1, self.granted):
            channel = self.connect(timeout)
            channels.append(channel)
            message = {"transfer_id": self.transfer_id, "session_key": self.session_key, "stream": stream}
            try:
                negotiate(channel, frame_type, message)
            except TransferRefused as exc:
                logger.warning(
                    "DWCP transfer %s continues with %d streams: %s", self.transfer_id, stream, exc
                )
                self.pool.release(channels.pop(), self.key)
                return

    def resume(self, count: int) -> tuple[list[Channel], ChunkMap]:
        """One reconnect attempt: RESUME every stream; the receiver's held chunks. A refusal is final."""
        channels: list[Channel] = []
        try:
            primary = self.connect(limits.TUNNEL_RECONNECT_TIMEOUT_SECONDS)
            channels.append(primary)
            message = {"transfer_id": self.transfer_id, "session_key": self.session_key, "stream": 0}
            answer = negotiate(primary, FrameType.RESUME, message)
            held = ChunkMap.from_ranges(count, answer.ranges("held", limit=count))
            self.join(channels, FrameType.RESUME, timeout=limits.TUNNEL_RECONNECT_TIMEOUT_SECONDS)
        except BaseException:
            for channel in channels:
                channel.close()
            raise
        return channels, held


def _reconnect(
    link: _Link, count: int, *, reason: str, down_since: float, outage_limit: float, control: TransferControl
) -> tuple[list[Channel], ChunkMap]:
    """After a cut: resume, retrying with a backoff (0.25 s doubling to 2 s, each attempt bounded to
    3 s) until ``outage_limit`` seconds after the cut. A refusal (forged key, session gone or over)
    and a refused connection (the receiver's server is gone, and the session with it) fail at once."""
    delay = 0.25
    while True:
        if control.cancelled.is_set():
            raise TransferCancelled(f"transfer {link.transfer_id} cancelled while its link was down")
        down = time.monotonic() - down_since
        if down > outage_limit:
            raise TransferInterrupted(
                f"link to {link.dest_node} down for {down:.0f} s, above the limit of {outage_limit:g} s "
                f"({reason})",
                code="link_outage",
            )
        try:
            return link.resume(count)
        except TransferRefused as exc:
            raise TransferInterrupted(
                f"{link.dest_node} refused to resume transfer {link.transfer_id}: {exc}",
                code="resume_refused",
            ) from exc
        except ConnectionRefusedError as exc:
            raise TransferInterrupted(
                f"the DWCP server of {link.dest_node} is gone ({exc}), and this transfer's session with it"
            ) from exc
        except (ProtocolError, OSError, TransferInterrupted) as exc:
            delay = reconnect_backoff(
                f"transfer {link.transfer_id}", link.dest_node, exc, delay, control.cancelled
            )


def _closed(channels: list[Channel]) -> list[Channel]:
    """Close the connections of a pass the link cut; none are left."""
    for channel in channels:
        channel.close()
    return []


def _resume_after(
    cut: str,
    link: _Link,
    *,
    count: int,
    tracker: ProgressTracker,
    control: TransferControl,
    outage_limit: float,
) -> tuple[list[Channel], ChunkMap, float]:
    """``_reconnect`` with the outage in the progress (phase "reconnecting", ``outage_seconds``);
    returns the new streams, the chunks the receiver holds and how long the outage lasted."""
    down_since = time.monotonic()
    tracker.phase, tracker.outage_since = "reconnecting", down_since
    logger.warning("DWCP transfer %s: link to %s lost (%s); resuming", link.transfer_id, link.dest_node, cut)
    channels, held = _reconnect(
        link, count, reason=cut, down_since=down_since, outage_limit=outage_limit, control=control
    )
    logger.info(
        "DWCP transfer %s resumed after %.1f s: %d of %d chunks held",
        link.transfer_id,
        time.monotonic() - down_since,
        held.held,
        count,
    )
    tracker.outage_since = None
    return channels, held, time.monotonic() - down_since


def _run_pass(transfer: _FileSend, channels: list[Channel], held: ChunkMap, stat: os.stat_result) -> str:
    """Send what the receiver does not hold on ``channels``, END, and return the digest it confirmed.
    Raises ``_LinkCut`` when a connection broke or went silent (the caller resumes)."""
    transfer.begin(held, channels)
    watch = LinkWatch(
        lambda _channel, quiet: transfer.cut(f"nothing heard from the receiver for {quiet:.1f} s")
    )
    try:
        for channel in channels:
            watch.add(channel)
        watchers = [_Watcher(channel, transfer, watch) for channel in channels]
        writers = [
            threading.Thread(target=transfer.write, args=(channel,), name=f"dwcp-send-{i}", daemon=True)
            for i, channel in enumerate(channels)
        ]
        for writer in writers:
            writer.start()
        transfer.produce()
        for writer in writers:
            writer.join()
        if transfer.failure is None and transfer.cut_reason is None:
            try:
                for channel in channels[1:]:
                    channel.send(control_frame(FrameType.END, {}))
            except (OSError, ProtocolError) as exc:
                transfer.cut(f"ending a stream failed: {exc}")
            for watcher in watchers[1:]:
                watcher.wait()
        transfer.check()
        primary = channels[0]
        if transfer.control.cancelled.is_set():
            primary.send(control_frame(FrameType.CANCEL, {}))
            watchers[0].wait()
            raise TransferCancelled(f"transfer {transfer.tracker.transfer_id} cancelled")
        after = os.fstat(transfer.fd)
        if (_source_size(transfer.fd, after), after.st_mtime_ns) != (transfer.size, stat.st_mtime_ns):
            raise TransferError("the source changed while it was being sent", code="source_changed")
        transfer.tracker.phase = "verifying"
        digest = files.file_digest(transfer.checksums)
        try:
            primary.send(control_frame(FrameType.END, {"digest": digest, "streams": len(channels)}))
        except (OSError, ProtocolError) as exc:
            transfer.cut(f"ending the transfer failed: {exc}")
        watchers[0].wait()
        transfer.check()
        result = watchers[0].result or {}
        if not result.get("ok") or result.get("digest") != digest:
            raise TransferError(f"receiver did not confirm the digest: {result}", code="verification_failed")
        return digest
    finally:
        watch.stop()


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
    link_outage_seconds: float = limits.TUNNEL_LINK_OUTAGE_SECONDS,
) -> TransferResult:
    """Send the file at ``path`` to the DWCP server at ``address`` (``HOST:PORT``) as ``name``.

    ``ticket`` must be a ticket for ``kind="file"`` and ``target=name``; ``base`` names a file
    under the receiver's root whose identical chunks are sent as references. Blocks until the
    receiver verified the whole-file digest and renamed the file into place. A cut link (connections
    broken, or silent for ``TUNNEL_LINK_SILENCE_SECONDS``) is reconnected and the transfer resumed
    with the session key the receiver handed out at ACCEPT, for up to ``link_outage_seconds`` (progress
    phase "reconnecting" with ``outage_seconds`` meanwhile); only chunks the receiver does not hold are
    sent again. Raises ``TransferRefused``, ``TransferInterrupted`` (code "link_outage" past the limit;
    a later call with a new ticket still resumes from the receiver's journal), ``TransferCancelled`` or
    another ``TransferError``.
    """
    if not 1 <= streams <= limits.MAX_STREAMS:
        raise ValueError(f"streams must be in 1..{limits.MAX_STREAMS}")
    if chunk_size & (chunk_size - 1) or not limits.MIN_CHUNK_SIZE <= chunk_size <= limits.MAX_CHUNK_SIZE:
        raise ValueError("chunk_size must be a power of two within the protocol limits")
    if link_outage_seconds <= 0:
        raise ValueError("link_outage_seconds must be positive")
    key = secret_bytes(secret)
    mode = codecs.CodecMode(codec)
    control = control or TransferControl()
    claims = peek_ticket(ticket)
    transfer_id = claims.transfer_id
    link = _Link(parse_address(address), key, claims.dest_node, transfer_id, pool or default_pool())
    source = Path(path)
    fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    channels: list[Channel] = []
    started = time.monotonic()
    stat = os.fstat(fd)
    size = _source_size(fd, stat)
    tracker = ProgressTracker(transfer_id, total_bytes=size, reporter=reporter)
    phase = "failed"
    try:
        primary = link.connect()
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
        link.session_key = accepted.text("session_key", max_length=64)
        count = files.chunk_count(size, chunk_size)
        held = ChunkMap.from_ranges(count, accepted.ranges("held", limit=count))
        link.granted = accepted.integer("streams", low=1, high=streams)
        index: dict[bytes, int] = {}
        if accepted.flag("index"):
            frame = primary.receive()
            if frame is None or frame.type is not FrameType.INDEX:
                raise RemoteProtocolError("expected the base INDEX frame")
            index = _parse_index(frame.payload)
        cut: str | None = None
        try:
            link.join(channels, FrameType.ATTACH, timeout=limits.HANDSHAKE_TIMEOUT_SECONDS)
        except (ProtocolError, OSError, TransferInterrupted) as exc:
            cut = f"opening a stream failed: {exc}"
            channels = _closed(channels)
        caps = primary.protocol.capabilities
        # Files start at zstd-1: the sockets take the first ~0.5 s of a transfer before any backlog
        # shows, so a start at lz4 sent that much of every file at lz4's ratio. bench-dwcp, A/B in one
        # session, two runs each: VM disk over 1 Gbit 1.75/1.51 s -> 1.59/1.13 s, over 100 Mbit
        # 2.04/1.89 s -> 1.51/1.60 s; a CPU-bound loopback copy drops to lz4 or raw after a window.
        # Tunnels keep lz4: they carry latency-bound streams and run beside two busy QEMUs.
        policy = codecs.AdaptivePolicy(
            mode,
            writers=max(len(channels), 1),
            allow_lz4=bool(caps & Capability.LZ4),
            allow_zstd=bool(caps & Capability.ZSTD),
            start=Codec.ZSTD,
        )
        resumed_bytes = sum(files.chunk_length(i, size, chunk_size) for i in range(count) if i in held)
        tracker.add(raw=resumed_bytes, wire=0, codec="held")
        transfer = _FileSend(
            fd=fd,
            size=size,
            chunk_size=chunk_size,
            index=index,
            policy=policy,
            control=control,
            tracker=tracker,
        )
        outages: list[float] = []
        try:
            while True:
                if cut is not None:
                    channels, held, outage = _resume_after(
                        cut,
                        link,
                        count=count,
                        tracker=tracker,
                        control=control,
                        outage_limit=link_outage_seconds,
                    )
                    outages.append(outage)
                tracker.phase = "transferring"
                try:
                    digest = _run_pass(transfer, channels, held, stat)
                    break
                except _LinkCut as exc:
                    cut = str(exc)
                    channels = _closed(channels)
        except TransferCancelled:
            phase = "cancelled"
            raise
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
            bytes_resent=transfer.bytes_resent,
            outages=outages,
        )
    except (ProtocolError, OSError) as exc:
        raise TransferInterrupted(f"transfer {transfer_id} interrupted: {exc}") from exc
    finally:
        os.close(fd)
        if phase != "done":
            tracker.finish(phase)
            _give_up(channels, phase)
        for channel in channels:
            link.pool.release(channel, key)  # closes it unless it is idle and healthy


def _give_up(channels: list[Channel], phase: str) -> None:
    """Tell the receiver this transfer is over (ERROR on every stream still streaming), so that it
    releases the session now rather than keep it for a resume that will never come."""
    message = {"code": "sender_failed", "message": f"the sender gave the transfer up ({phase})"}
    for channel in channels:
        with contextlib.suppress(OSError, ProtocolError):
            channel.send(control_frame(FrameType.ERROR, message))
