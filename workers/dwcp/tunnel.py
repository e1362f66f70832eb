"""Byte-stream tunnels: a unix socket on one node joined to a unix socket on the other, surviving
cuts of the link between them.

Both ends run the same ``TunnelEndpoint``. Outbound, a pump thread reads the local socket, numbers
each read with a sequence number, has the codec pool encode it, and files it in the replay window;
stream writers take frames from the window in sequence (a send cursor), so each TCP stream carries
increasing sequence numbers. Inbound, each stream's reader decodes frames and files them in a
reorder buffer; a delivery thread writes them to the local socket strictly in sequence. A reader
whose frame is more than ``REORDER_WINDOW`` ahead of the next deliverable one waits, which bounds
the buffer and pushes back through TCP. This cannot deadlock: the frame that unblocks delivery sits
on some stream behind only lower-numbered frames, which are never held back. EOF frames carry the
count of data frames before them, so a half-close is delivered in order too.

Resume (protocol version 2): the receiver acknowledges what it delivered (ACK frames, cumulative,
every ``TUNNEL_ACK_EVERY_FRAMES`` frames or ``TUNNEL_ACK_INTERVAL_SECONDS``; on every connection
at least every ``TUNNEL_KEEPALIVE_SECONDS``). The window keeps each frame until it is acknowledged
and holds at most ``replay_window`` raw bytes: the pump stops reading the local socket while it is
full, which slows QEMU's pre-copy and never the guest. A connection silent for
``TUNNEL_LINK_SILENCE_SECONDS`` (or broken) cuts the link: every connection of that generation is
shut down and the endpoint waits. The client end (``Tunnel``) reconnects and sends RESUME with the
session key; both ends then send again from the peer's next needed sequence number, and the
receiver drops what it already holds. An outage longer than ``outage_limit`` fails the tunnel on
both ends with that reason. The tunnel is done when both EOFs were delivered and ours acknowledged.

One file on purpose: the pump, the writers, the readers, the reorder buffer, the delivery and the
resume share one sequence numbering and one shutdown protocol, whose invariants (in order,
bounded, no deadlock, nothing lost across a cut) are read here together.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from typing import Any

from . import codecs, limits
from .control import TransferControl
from .errors import (
    ConnectionLost,
    ProtocolError,
    RemoteProtocolError,
    TransferCancelled,
    TransferError,
    TransferInterrupted,
    TransferRefused,
)
from .frames import (
    HEADER_SIZE,
    MAX_U64,
    ControlMessage,
    Frame,
    FrameType,
    control_frame,
    make_frame,
    parse_control,
)
from .progress import ProgressTracker, Reporter
from .protocol import Capability
from .sender import codec_pool, negotiate
from .tickets import peek_ticket, secret_bytes
from .transport import (
    Channel,
    ConnectionPool,
    default_pool,
    parse_address,
    reconnect_backoff,
    set_tunnel_buffers,
)

logger = logging.getLogger(__name__)

# close(): how long the tunnel may take to end by itself before its connections are shut down.
CLOSE_GRACE_SECONDS = 1.0
# How often the endpoint's ticker acknowledges, sends keepalives and checks the link.
TICK_SECONDS = 0.05

_EOF = object()
WindowItem = Frame | Future[codecs.EncodedChunk] | object  # object: _EOF, not yet framed


@dataclass(slots=True)
class _Link:
    """One connection of the current generation, as the ticker sees it."""

    channel: Channel
    last_heard: float
    last_sent: float
    receiving: bool = False  # its reader waits on the socket (not on our reorder buffer)


class TunnelEndpoint:
    """One end of a tunnel: pumps a local socket to N channels and back, in order, across cuts."""

    def __init__(
        self,
        local: socket.socket,
        *,
        policy: codecs.AdaptivePolicy,
        control: TransferControl,
        tracker: ProgressTracker,
        outage_limit: float = limits.TUNNEL_LINK_OUTAGE_SECONDS,
        replay_window: int = limits.TUNNEL_REPLAY_WINDOW_BYTES,
        peer: str = "peer",
        on_failed: Callable[[], None] | None = None,
    ) -> None:
        if outage_limit <= 0 or replay_window < limits.TUNNEL_FRAME_MAX:
            raise ValueError("outage_limit must be > 0 and replay_window at least one frame")
        self.local = local
        self.policy = policy
        self.control = control
        self.tracker = tracker
        self.outage_limit = outage_limit
        self.replay_window = replay_window
        self.peer = peer
        self._on_failed = on_failed
        self.outbound_done = threading.Event()  # the peer delivered our EOF
        self.inbound_done = threading.Event()  # we delivered the peer's EOF
        self.failed = threading.Event()
        self.link_lost = threading.Event()  # set while the link is cut (until a resume)
        self.failure: BaseException | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.bytes_resent = 0  # raw bytes sent again after a reconnect
        self.window_peak = 0  # most raw bytes the window held
        self.duplicates_dropped = 0  # frames received again after a reconnect and dropped
        self.outages: list[float] = []  # lengths of the outages this tunnel came back from
        self._cond = threading.Condition()
        # outbound: seq -> (raw length, item) for every frame read and not yet acknowledged
        self._window: dict[int, tuple[int, WindowItem]] = {}
        self._window_raw = 0
        self._read_seq = 0  # next sequence number the pump assigns
        self._cursor = 0  # next sequence number a writer sends
        self._sent_high = 0  # one past the highest sequence number ever sent
        self._acked = 0  # the peer delivered everything below this
        self._eof_seq: int | None = None
        # inbound
        self._reorder: dict[int, bytes | bytearray | memoryview | object] = {}
        self._next_seq = 0  # next sequence number to deliver (= frames delivered)
        self._ack_sent = 0  # the last _next_seq we acknowledged
        self._ack_sent_at = time.monotonic()
        # link
        self._generation = 0
        self._links: dict[Channel, _Link] = {}
        self._down_since: float | None = None
        self._closed = threading.Event()
        self._threads = [
            threading.Thread(target=self._pump, name="dwcp-tunnel-pump", daemon=True),
            threading.Thread(target=self._deliver, name="dwcp-tunnel-deliver", daemon=True),
            threading.Thread(target=self._tick, name="dwcp-tunnel-tick", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    # -- failure ---------------------------------------------------------------------------------

    def fail(self, error: BaseException) -> None:
        with self._cond:
            first = not self.failed.is_set()
            if self.failure is None:
                self.failure = error
            self.failed.set()
            self._cond.notify_all()
        with contextlib.suppress(OSError):
            self.local.shutdown(socket.SHUT_RDWR)
        if first and self._on_failed is not None:
            self._on_failed()

    @property
    def finished(self) -> bool:
        return self.outbound_done.is_set() and self.inbound_done.is_set()

    @property
    def delivered(self) -> int:
        """Frames delivered to the local socket: the peer resumes sending from this number."""
        with self._cond:
            return self._next_seq

    @property
    def generation(self) -> int:
        with self._cond:
            return self._generation

    @property
    def cut(self) -> bool:
        """The link is down and this end waits for a resume (neither failed nor finished)."""
        return self.link_lost.is_set() and not self.failed.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Until finished, failed or cut (``link_lost``); False if ``timeout`` passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not (self.finished or self.failed.is_set() or self.link_lost.is_set()):
            if self.control.cancelled.is_set():
                self.fail(TransferCancelled("tunnel cancelled"))
                break
            if deadline is not None and time.monotonic() > deadline:
                return False
            self.failed.wait(0.05)
        return True

    # -- the link --------------------------------------------------------------------------------

    def add_channel(self, channel: Channel, generation: int) -> None:
        """Carry the tunnel on ``channel`` too (a writer thread starts; the caller runs
        ``read_channel``). A channel of a generation already cut is shut down instead."""
        now = time.monotonic()
        with self._cond:
            current = generation == self._generation and not self.link_lost.is_set()
            if current:
                self._links[channel] = _Link(channel, now, now)
        if not current:
            with contextlib.suppress(OSError):
                channel.sock.shutdown(socket.SHUT_RDWR)
            return
        set_tunnel_buffers(channel.sock, tunnel=True)
        threading.Thread(
            target=self._write_channel, args=(channel, generation), name="dwcp-tunnel-write", daemon=True
        ).start()

    def cut_link(self, generation: int, reason: str) -> None:
        """A connection of ``generation`` broke: cut them all and wait for a resume."""
        with self._cond:
            if generation != self._generation or self.failed.is_set() or self.link_lost.is_set():
                return
            if self.finished:
                return  # everything was delivered both ways; only the END exchange is left
            self._generation += 1
            self._down_since = self.tracker.outage_since = time.monotonic()
            self.tracker.phase = "reconnecting"
            channels = list(self._links)
            self._links.clear()
            self.link_lost.set()
            self._cond.notify_all()
        logger.warning(
            "DWCP tunnel %s: link to %s lost (%s); waiting for a resume",
            self.tracker.transfer_id,
            self.peer,
            reason,
        )
        for channel in channels:
            with contextlib.suppress(OSError):
                channel.sock.shutdown(socket.SHUT_RDWR)

    def resume(self, peer_next_seq: int) -> int:
        """Start a new generation after a cut (or a peer that saw one first): send again from
        ``peer_next_seq``, the peer's next needed frame. Returns the generation to add channels to."""
        with self._cond:
            if self.failed.is_set():
                raise TransferInterrupted(f"tunnel already failed: {self.failure}")
            if not self._acked <= peer_next_seq <= self._sent_high:
                raise RemoteProtocolError(
                    f"peer resumes at frame {peer_next_seq}, outside {self._acked}..{self._sent_high}"
                )
            self._acknowledged(peer_next_seq)
            self._generation += 1
            self._cursor = peer_next_seq
            old = list(self._links)
            self._links.clear()
            if self._down_since is not None:
                self.outages.append(time.monotonic() - self._down_since)
            self._down_since = self.tracker.outage_since = None
            self.tracker.phase = "transferring"
            self.link_lost.clear()
            self._cond.notify_all()
            generation = self._generation
        for channel in old:  # the peer saw the cut before we did
            with contextlib.suppress(OSError):
                channel.sock.shutdown(socket.SHUT_RDWR)
        logger.info(
            "DWCP tunnel %s resumed with %s at frame %d (we deliver from %d)",
            self.tracker.transfer_id,
            self.peer,
            peer_next_seq,
            self.delivered,
        )
        return generation

    def _acknowledged(self, count: int) -> None:
        """The peer delivered every frame below ``count`` (called with the lock held)."""
        if count > self._sent_high:
            raise RemoteProtocolError(f"peer acknowledged frame {count - 1}, never sent")
        for seq in range(self._acked, count):
            raw_length, _ = self._window.pop(seq)
            self._window_raw -= raw_length
        self._acked = max(self._acked, count)
        if self._eof_seq is not None and self._acked > self._eof_seq:
            self.outbound_done.set()
        self._cond.notify_all()

    def _tick(self) -> None:
        """Acknowledge, keep every connection alive, notice silent ones and the outage limit."""
        while not (self.failed.wait(TICK_SECONDS) or self._closed.is_set()):
            now = time.monotonic()
            with self._cond:
                links = list(self._links.values())
                generation = self._generation
                pending = self._next_seq - self._ack_sent
                due = pending >= limits.TUNNEL_ACK_EVERY_FRAMES or (
                    pending > 0 and now - self._ack_sent_at >= limits.TUNNEL_ACK_INTERVAL_SECONDS
                )
                ack = self._next_seq
                down_since = self._down_since
            if down_since is not None and now - down_since > self.outage_limit:
                self.fail(
                    TransferInterrupted(
                        f"link to {self.peer} down for {now - down_since:.0f} s, "
                        f"above the limit of {self.outage_limit:g} s",
                        code="link_outage",
                    )
                )
                return
            for link in links:
                if link.receiving and now - link.last_heard > limits.TUNNEL_LINK_SILENCE_SECONDS:
                    self.cut_link(generation, f"nothing heard for {now - link.last_heard:.1f} s")
                    break
                keepalive = now - link.last_sent >= limits.TUNNEL_KEEPALIVE_SECONDS
                if not (due or keepalive):
                    continue
                try:
                    sent = link.channel.try_send(make_frame(FrameType.ACK, seq_or_offset=ack))
                except ProtocolError:
                    continue  # the connection is ending (END, RESULT): no more ACKs on it
                except OSError as exc:
                    self.cut_link(generation, f"sending an ACK failed: {exc}")
                    break
                if sent:
                    link.last_sent = now
                    if due:
                        due = False
                        with self._cond:
                            self._ack_sent = max(self._ack_sent, ack)
                            self._ack_sent_at = now

    # -- outbound --------------------------------------------------------------------------------

    def _pump(self) -> None:
        pool = codec_pool()
        seq = 0
        try:
            while True:
                with self._cond:
                    while not self.failed.is_set() and (
                        self._window_raw >= self.replay_window
                        or self._read_seq - self._cursor >= limits.TUNNEL_SEND_QUEUE_DEPTH
                    ):
                        self._cond.wait()
                    if self.failed.is_set():
                        return
                data = self.local.recv(limits.TUNNEL_CHUNK_SIZE)
                if not data:
                    break
                self.bytes_out += len(data)
                future = pool.submit(codecs.encode, data, self.policy.level)
                with self._cond:
                    self._window[seq] = (len(data), future)
                    self._window_raw += len(data)
                    self.window_peak = max(self.window_peak, self._window_raw)
                    seq = self._read_seq = seq + 1
                    self._cond.notify_all()
            with self._cond:
                self._window[seq] = (0, _EOF)
                self._eof_seq = seq
                self._read_seq = seq + 1
                self._cond.notify_all()
        except OSError as exc:
            if not self.failed.is_set():
                self.fail(TransferError(f"local socket failed: {exc}", code="local_socket"))

    def _frame(self, seq: int, item: WindowItem) -> tuple[Frame, float]:
        """The frame for a window item, encoded once; with the seconds waited for the codec."""
        if isinstance(item, Frame):
            return item, 0.0
        if item is _EOF:
            return make_frame(FrameType.EOF, seq_or_offset=seq), 0.0
        assert isinstance(item, Future)
        started = time.monotonic()
        chunk = item.result()
        waited = time.monotonic() - started
        frame = make_frame(
            FrameType.DATA,
            chunk.payload,
            codec=chunk.codec,
            seq_or_offset=seq,
            raw_length=chunk.raw_length,
            checksum=chunk.checksum,
        )
        return frame, waited

    def _write_channel(self, channel: Channel, generation: int) -> None:
        """Writer loop for one channel of one generation (run in its own thread)."""
        while True:
            with self._cond:
                while (
                    not self.failed.is_set()
                    and generation == self._generation
                    and self._cursor not in self._window
                ):
                    self._cond.wait()
                if self.failed.is_set() or generation != self._generation:
                    return
                seq = self._cursor
                self._cursor += 1
                raw_length, item = self._window[seq]
                resend = seq < self._sent_high
                self._sent_high = max(self._sent_high, seq + 1)
                self._cond.notify_all()  # the pump may read again
            try:
                frame, codec_wait = self._frame(seq, item)
                with self._cond:
                    if seq in self._window:
                        self._window[seq] = (raw_length, frame)
                if frame.type is FrameType.DATA:
                    self.control.bucket.acquire(HEADER_SIZE + frame.wire_length)
                wire = channel.send(frame)
            except (OSError, ProtocolError) as exc:
                self.cut_link(generation, f"sending failed: {exc}")
                return
            except BaseException as exc:
                if generation == self.generation:
                    self.fail(exc)
                return
            with self._cond:
                link = self._links.get(channel)
                if link is not None:
                    link.last_sent = time.monotonic()
            if frame.type is not FrameType.DATA:
                continue
            if resend:
                self.bytes_resent += raw_length
                self.tracker.add(raw=0, wire=wire)
                continue
            # Only the wait for the codec pool tells of a busy CPU. Waiting for the window means the
            # local socket had nothing to send (QEMU producing slower than the link): no codec
            # helps then, and counting it made the policy drop to raw while the link was busy.
            self.policy.record(
                starved_seconds=codec_wait,
                backlogged=channel.unsent_bytes() > limits.TUNNEL_LINK_BACKLOG_BYTES,
            )
            self.tracker.add(raw=frame.raw_length, wire=wire, codec=frame.codec.name.lower())

    # -- inbound ---------------------------------------------------------------------------------

    def receive_frame(self, frame: Frame) -> None:
        """File a DATA or EOF frame from any channel into the reorder buffer (may wait); a frame
        already delivered or buffered (sent again after a cut) is dropped."""
        item: bytes | bytearray | memoryview | object
        if frame.type is FrameType.EOF:
            item = _EOF
        elif frame.codec is codecs.Codec.REF:
            raise RemoteProtocolError("references are not allowed in tunnels")
        elif frame.raw_length > limits.TUNNEL_FRAME_MAX:
            # Keeps the reorder buffer within REORDER_WINDOW x TUNNEL_FRAME_MAX.
            raise RemoteProtocolError(f"tunnel frame of {frame.raw_length} bytes is too large")
        else:
            item = codecs.decode(frame)
        seq = frame.seq_or_offset
        with self._cond:
            while seq >= self._next_seq + limits.REORDER_WINDOW and not self.failed.is_set():
                self._cond.wait()
            if seq < self._next_seq or seq in self._reorder:
                self.duplicates_dropped += 1
                return
            self._reorder[seq] = item
            self._cond.notify_all()

    def _deliver(self) -> None:
        try:
            while True:
                with self._cond:
                    while self._next_seq not in self._reorder and not self.failed.is_set():
                        self._cond.wait()
                    if self.failed.is_set():
                        return
                    item = self._reorder.pop(self._next_seq)
                if item is _EOF:
                    with contextlib.suppress(OSError):
                        self.local.shutdown(socket.SHUT_WR)
                else:
                    assert isinstance(item, bytes | bytearray | memoryview)
                    self.local.sendall(item)
                    self.bytes_in += len(item)
                # Counted as delivered only once written: a resume restarts the peer from here.
                with self._cond:
                    self._next_seq += 1
                    self._cond.notify_all()
                if item is _EOF:
                    self.inbound_done.set()
                    return
        except OSError as exc:
            self.fail(TransferError(f"local socket failed: {exc}", code="local_socket"))

    def read_channel(self, channel: Channel, generation: int, *, responder: bool) -> None:
        """Reader loop for one channel until the tunnel ends on it (END/RESULT), fails, or the
        channel breaks (then the link is cut and the endpoint waits for a resume)."""
        with self._cond:
            link = self._links.get(channel)
        try:
            while True:
                if link is not None:
                    link.last_heard, link.receiving = time.monotonic(), True
                try:
                    frame = channel.receive()
                except TimeoutError:
                    if self.failed.is_set() or generation != self.generation:
                        return
                    continue
                if link is not None:
                    link.last_heard, link.receiving = time.monotonic(), False
                if frame is None:
                    raise ConnectionLost("peer closed the tunnel connection")
                if frame.type in (FrameType.DATA, FrameType.EOF):
                    self.receive_frame(frame)
                elif frame.type is FrameType.ACK:
                    with self._cond:
                        self._acknowledged(frame.seq_or_offset)
                elif frame.type is FrameType.END and responder:
                    self._answer_end(channel)
                    return
                elif frame.type is FrameType.RESULT and not responder:
                    return
                elif frame.type is FrameType.ERROR:
                    fields = parse_control(frame).fields
                    raise TransferError(
                        f"peer failed the tunnel: {fields.get('message')}", code="remote_error"
                    )
                else:
                    raise RemoteProtocolError(f"unexpected {frame.type.name} in a tunnel")
        except BaseException as exc:
            if generation != self.generation:
                return  # a connection of a generation already cut (closed by the reconnect)
            if isinstance(exc, ConnectionLost | OSError):
                self.cut_link(generation, f"connection broke: {exc}")
            elif isinstance(exc, ProtocolError):
                if not self.failed.is_set():
                    self.fail(TransferInterrupted(f"tunnel connection broke: {exc}"))
            else:
                self.fail(exc)

    def _answer_end(self, channel: Channel) -> None:
        # Answer only once everything from the peer reached the local socket: the session (and
        # that socket) is torn down when the last stream has answered. Bounded: a local end that
        # stops reading (the soak saw QEMU's NBD server do so after the switch) would otherwise
        # hold this session, and its target, forever.
        deadline = time.monotonic() + limits.TUNNEL_END_DRAIN_SECONDS
        while not (self.inbound_done.wait(0.1) or self.failed.is_set()):
            if time.monotonic() > deadline:
                self.fail(TransferError("the local socket stopped reading", code="local_socket"))
        if not self.failed.is_set():
            channel.send(control_frame(FrameType.RESULT, {"ok": True}))

    def close(self) -> None:
        if not self.failed.is_set():
            self.fail(TransferCancelled("tunnel closed"))
        self._closed.set()
        with contextlib.suppress(OSError):
            self.local.close()
        for thread in self._threads:
            if thread is not threading.current_thread():  # the ticker may end the tunnel itself
                thread.join(timeout=1.0)


@dataclass(frozen=True, slots=True)
class TunnelResult:
    transfer_id: str
    bytes_sent: int  # raw bytes read from the local socket and sent to the peer
    bytes_received: int  # raw bytes received from the peer and written to the local socket
    wire_bytes: int
    seconds: float
    streams: int
    codec_mix: dict[str, int] = field(default_factory=dict)
    bytes_resent: int = 0  # raw bytes sent again after link cuts
    outages: list[float] = field(default_factory=list)  # seconds each cut lasted

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Tunnel:
    """Initiator side: listens on ``local_path``; the first client is joined to the remote socket."""

    def __init__(
        self,
        *,
        address: str,
        local_path: str | os.PathLike[str],
        ticket: str,
        secret: str | bytes,
        source_node: str,
        streams: int,
        codec: str,
        control: TransferControl,
        reporter: Reporter | None,
        pool: ConnectionPool,
        link_outage_seconds: float = limits.TUNNEL_LINK_OUTAGE_SECONDS,
        replay_window: int = limits.TUNNEL_REPLAY_WINDOW_BYTES,
    ) -> None:
        if not 1 <= streams <= limits.MAX_STREAMS:
            raise ValueError(f"streams must be in 1..{limits.MAX_STREAMS}")
        self.local_path = os.fspath(local_path)
        claims = peek_ticket(ticket)
        self.transfer_id = claims.transfer_id
        self._target = claims.target
        # A tunnel, or a VM's console as one more viewer; any other ticket is asked for as a tunnel,
        # and the server refuses it as the wrong kind.
        self._kind = "console" if claims.kind == "console" else "tunnel"
        self._dest_node = claims.dest_node  # the node a TLS server must prove to be
        self.control = control
        self._address = parse_address(address)
        self._ticket = ticket
        self._secret = secret_bytes(secret)
        self._source_node = source_node
        self._streams = streams
        self._mode = codecs.CodecMode(codec)
        self._reporter = reporter
        self._pool = pool
        self._outage_limit = link_outage_seconds
        self._replay_window = replay_window
        self._session_key = ""
        self._granted = 1
        self._readers: list[threading.Thread] = []
        self._result: TunnelResult | None = None
        self._error: BaseException | None = None
        self._endpoint: TunnelEndpoint | None = None
        self._tracker: ProgressTracker | None = None
        self._channels: list[Channel] = []
        self._closing = threading.Event()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.local_path)
        self._listener.bind(self.local_path)
        os.chmod(self.local_path, 0o600)
        self._listener.listen(1)
        self._thread = threading.Thread(target=self._run, name="dwcp-tunnel", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            local, _ = self._listener.accept()
        except OSError as exc:
            self._error = TransferCancelled(f"tunnel closed before a client connected: {exc}")
            return
        finally:
            self._listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.local_path)
        try:
            self._result = self._relay(local)
        except BaseException as exc:
            self._error = exc
        finally:
            local.close()

    def _relay(self, local: socket.socket) -> TunnelResult:
        started = time.monotonic()
        tracker = ProgressTracker(self.transfer_id, total_bytes=None, reporter=self._reporter)
        self._tracker = tracker
        endpoint: TunnelEndpoint | None = None
        phase = "failed"
        try:
            primary, accepted = self._open(tracker)
            self._session_key = accepted.text("session_key", max_length=64)
            self._granted = accepted.integer("streams", low=1, high=self._streams)
            caps = primary.protocol.capabilities
            policy = codecs.AdaptivePolicy(
                self._mode,
                writers=self._granted,
                allow_lz4=bool(caps & Capability.LZ4),
                allow_zstd=bool(caps & Capability.ZSTD),
            )
            tracker.phase = "transferring"
            endpoint = TunnelEndpoint(
                local,
                policy=policy,
                control=self.control,
                tracker=tracker,
                outage_limit=self._outage_limit,
                replay_window=self._replay_window,
                peer=self._dest_node,
            )
            self._endpoint = endpoint
            if self._closing.is_set():  # close() ran while the stream was being opened
                endpoint.fail(TransferCancelled("tunnel closed"))
            self._carry(endpoint, primary, 0)
            try:
                for stream in range(1, self._granted):
                    self._join(endpoint, FrameType.ATTACH, stream, 0)
            except (ProtocolError, OSError, TransferInterrupted) as exc:
                endpoint.cut_link(0, f"opening stream failed: {exc}")  # resumed below
            while True:
                endpoint.wait()
                if endpoint.failure is not None:
                    raise endpoint.failure
                if endpoint.finished:
                    break
                self._reconnect(endpoint)
            self._end(endpoint)
            phase = "done"
            final = tracker.finish(phase)
            return TunnelResult(
                transfer_id=self.transfer_id,
                bytes_sent=endpoint.bytes_out,
                bytes_received=endpoint.bytes_in,
                wire_bytes=final.wire_bytes,
                seconds=time.monotonic() - started,
                streams=self._granted,
                codec_mix=final.codec_mix,
                bytes_resent=endpoint.bytes_resent,
                outages=list(endpoint.outages),
            )
        except (ProtocolError, OSError) as exc:
            raise TransferInterrupted(f"tunnel {self.transfer_id} interrupted: {exc}") from exc
        finally:
            if phase != "done":
                cancelled = self.control.cancelled.is_set() or self._closing.is_set()
                tracker.finish("cancelled" if cancelled else phase)
                self._give_up(endpoint)
            if endpoint is not None:
                endpoint.close()
            for channel in self._channels:
                set_tunnel_buffers(channel.sock, tunnel=False)
                self._pool.release(channel, self._secret)

    def _open(self, tracker: ProgressTracker) -> tuple[Channel, ControlMessage]:
        """OPEN the tunnel on its first stream; a link that is down (QEMU connected during a cut) is
        retried with a backoff for up to the outage limit. A refusal is final."""
        delay, first_failure = 0.25, None
        while True:
            timeout = (
                limits.HANDSHAKE_TIMEOUT_SECONDS
                if first_failure is None
                else limits.TUNNEL_RECONNECT_TIMEOUT_SECONDS
            )
            try:
                primary = self._pool.acquire(self._address, self._secret, self._dest_node, timeout=timeout)
                self._channels.append(primary)
                accepted = negotiate(
                    primary,
                    FrameType.OPEN,
                    {
                        "ticket": self._ticket,
                        "kind": self._kind,
                        "target": self._target,
                        "source_node": self._source_node,
                        "streams": self._streams,
                    },
                )
                tracker.outage_since = None
                return primary, accepted
            except TransferRefused:
                raise
            except ConnectionRefusedError as exc:
                raise TransferInterrupted(self._server_gone(exc)) from exc
            except (ProtocolError, OSError, TransferInterrupted) as exc:
                now = time.monotonic()
                first_failure = first_failure or now
                if self._closing.is_set() or now - first_failure > self._outage_limit:
                    raise TransferInterrupted(
                        f"link to {self._dest_node} down for {now - first_failure:.0f} s, "
                        f"above the limit of {self._outage_limit:g} s: {exc}",
                        code="link_outage",
                    ) from exc
                tracker.phase, tracker.outage_since = "reconnecting", first_failure
                logger.info(
                    "DWCP tunnel %s: opening to %s failed (%s); retrying in %.2f s",
                    self.transfer_id,
                    self._dest_node,
                    exc,
                    delay,
                )
                self._drop_broken_channels()
                self._closing.wait(delay)
                delay = min(2 * delay, limits.TUNNEL_RECONNECT_BACKOFF_MAX_SECONDS)

    def _carry(self, endpoint: TunnelEndpoint, channel: Channel, generation: int) -> None:
        """Carry the tunnel on ``channel``: a writer and a reader thread for it."""
        endpoint.add_channel(channel, generation)
        reader = threading.Thread(
            target=endpoint.read_channel,
            args=(channel, generation),
            kwargs={"responder": False},
            name="dwcp-tunnel-read",
            daemon=True,
        )
        self._readers.append(reader)
        reader.start()

    def _join(self, endpoint: TunnelEndpoint, frame_type: FrameType, stream: int, generation: int) -> int:
        """Open one more stream (ATTACH, or RESUME after a cut); returns its generation."""
        timeout = (
            limits.TUNNEL_RECONNECT_TIMEOUT_SECONDS
            if frame_type is FrameType.RESUME
            else limits.HANDSHAKE_TIMEOUT_SECONDS
        )
        channel = self._pool.acquire(self._address, self._secret, self._dest_node, timeout=timeout)
        self._channels.append(channel)
        message: dict[str, Any] = {
            "transfer_id": self.transfer_id,
            "session_key": self._session_key,
            "stream": stream,
        }
        if frame_type is FrameType.RESUME:
            message["next_seq"] = endpoint.delivered
        answer = negotiate(channel, frame_type, message)
        if frame_type is FrameType.RESUME and stream == 0:
            generation = endpoint.resume(answer.integer("next_seq", low=0, high=MAX_U64))
        self._carry(endpoint, channel, generation)
        return generation

    def _reconnect(self, endpoint: TunnelEndpoint) -> None:
        """After a cut: RESUME every stream, retrying with a backoff until the endpoint's outage
        limit fails it. A refusal (the peer gave the session up) fails the tunnel at once."""
        delay = 0.25
        while endpoint.cut and not self._closing.is_set():
            self._drop_broken_channels()
            try:
                generation = self._join(endpoint, FrameType.RESUME, 0, 0)
                for stream in range(1, self._granted):
                    self._join(endpoint, FrameType.RESUME, stream, generation)
                return
            except TransferRefused as exc:
                endpoint.fail(TransferInterrupted(f"{self._dest_node} refused to resume the tunnel: {exc}"))
            except ConnectionRefusedError as exc:
                endpoint.fail(TransferInterrupted(self._server_gone(exc)))
            except (ProtocolError, OSError, TransferInterrupted) as exc:
                delay = reconnect_backoff(
                    f"tunnel {self.transfer_id}", self._dest_node, exc, delay, endpoint.failed
                )

    def _server_gone(self, exc: OSError) -> str:
        """A refused connection: the peer host answers but its DWCP server is gone (its worker died
        or restarted), and the tunnel's session with it. Waiting out the outage limit cannot help."""
        return f"the DWCP server of {self._dest_node} is gone ({exc}), and this tunnel's session with it"

    def _drop_broken_channels(self) -> None:
        for channel in self._channels:
            channel.close()
        self._channels.clear()

    def _give_up(self, endpoint: TunnelEndpoint | None) -> None:
        """Tell the peer this tunnel is over (ERROR on every stream), so that its end is released
        now rather than kept for a resume that will never come."""
        reason = endpoint.failure if endpoint is not None else None
        message = {"code": "tunnel_failed", "message": str(reason or "tunnel closed")}
        for channel in self._channels:
            with contextlib.suppress(OSError, ProtocolError):
                channel.send(control_frame(FrameType.ERROR, message))

    def _end(self, endpoint: TunnelEndpoint) -> None:
        """Both directions were delivered: END every stream and wait for the RESULTs. A cut now
        loses nothing (the peer gives its session up when its streams break)."""
        for channel in self._channels:
            with contextlib.suppress(OSError, ProtocolError):
                channel.send(control_frame(FrameType.END, {}))
        for reader in self._readers:
            reader.join(limits.TUNNEL_END_DRAIN_SECONDS)
        if endpoint.failure is not None:
            raise endpoint.failure

    def wait(self, timeout: float | None = None) -> TunnelResult:
        """Block until the tunnel ended; returns its result or raises why it failed."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"tunnel {self.transfer_id} still running")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    @property
    def accepted(self) -> bool:
        """The peer accepted the ticket and bytes flow (stays True once set)."""
        return self._endpoint is not None

    @property
    def failure(self) -> TransferError | None:
        """Why the tunnel failed, while or after it ran (None: it did not, or not yet)."""
        failure = self._endpoint.failure if self._endpoint is not None else self._error
        return failure if isinstance(failure, TransferError) else None

    @property
    def ended(self) -> bool:
        """The tunnel is over (``wait(0)`` then returns its result or raises why it failed)."""
        return not self._thread.is_alive()

    @property
    def wire_bytes(self) -> int:
        """Bytes this tunnel has put on the wire so far (also after ``close()``)."""
        return self._tracker.snapshot().wire_bytes if self._tracker is not None else 0

    def close(self) -> None:
        """Stop accepting and tear this tunnel down (a no-op once it finished). A ``control``
        shared with other transfers is left alone: ``control.cancel()`` cancels all of them."""
        self._closing.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        if self._endpoint is not None:
            self._endpoint.fail(TransferCancelled("tunnel closed"))
        self._thread.join(timeout=CLOSE_GRACE_SECONDS)
        if self._thread.is_alive():
            # A stream thread blocked on its connection (waiting for a peer that never ends the
            # tunnel) does not see the failure; shutting the sockets down wakes it. Until then the
            # peer's server kept the tunnel's target busy, refusing the VM's next migration.
            for channel in list(self._channels):
                with contextlib.suppress(OSError):
                    channel.sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5.0)


def open_tunnel(
    *,
    address: str,
    local_path: str | os.PathLike[str],
    ticket: str,
    secret: str | bytes,
    source_node: str,
    streams: int = limits.DEFAULT_STREAMS,
    codec: str = "auto",
    control: TransferControl | None = None,
    reporter: Reporter | None = None,
    pool: ConnectionPool | None = None,
    link_outage_seconds: float = limits.TUNNEL_LINK_OUTAGE_SECONDS,
    replay_window: int = limits.TUNNEL_REPLAY_WINDOW_BYTES,
) -> Tunnel:
    """Listen on the unix socket ``local_path``; the first client to connect is joined, through
    the DWCP server at ``address``, to the unix socket the ticket's target names on that node.

    Returns at once (the socket is listening). ``Tunnel.wait()`` returns a ``TunnelResult`` once
    both directions reached EOF; ``Tunnel.close()`` cancels. A cut link is reconnected and the
    tunnel resumed for up to ``link_outage_seconds``; ``replay_window`` bounds the raw bytes kept
    for that (each direction), and so how far the local socket's writer may run ahead of the peer.
    """
    return Tunnel(
        address=address,
        local_path=local_path,
        ticket=ticket,
        secret=secret,
        source_node=source_node,
        streams=streams,
        codec=codec,
        control=control or TransferControl(),
        reporter=reporter,
        pool=pool or default_pool(),
        link_outage_seconds=link_outage_seconds,
        replay_window=replay_window,
    )
