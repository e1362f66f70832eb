"""Byte-stream tunnels: a unix socket on one node joined to a unix socket on the other.

Both ends run the same ``TunnelEndpoint``. Outbound, a pump thread reads the local socket, numbers
each read with a sequence number, has the codec pool encode it, and queues it (bounded) for the
stream writers, which take frames in order, so each TCP stream carries increasing sequence
numbers. Inbound, each stream's reader decodes frames and files them in a reorder buffer; a
delivery thread writes them to the local socket strictly in sequence. A reader whose frame is more
than ``REORDER_WINDOW`` ahead of the next deliverable one waits, which bounds the buffer and pushes
back through TCP. This cannot deadlock: the frame that unblocks delivery sits on some stream behind
only lower-numbered frames, which are never held back. EOF frames carry the count of data frames
before them, so a half-close is delivered in order too; the tunnel is done when both directions
have seen EOF. NBD (two-way) and the QEMU migration stream (mostly one-way) both fit.

One file of some 500 lines on purpose: the pump, the writers, the readers, the reorder buffer and
the delivery share one sequence numbering and one shutdown protocol, whose invariants (in order,
bounded, no deadlock) are read here together.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import threading
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from typing import Any

from . import codecs, limits
from .control import TransferControl
from .errors import (
    ProtocolError,
    RemoteProtocolError,
    TransferCancelled,
    TransferError,
    TransferInterrupted,
)
from .frames import HEADER_SIZE, Frame, FrameType, control_frame, make_frame, parse_control
from .progress import ProgressTracker, Reporter
from .protocol import Capability
from .sender import codec_pool, negotiate
from .tickets import peek_ticket, secret_bytes
from .transport import Channel, ConnectionPool, default_pool, parse_address, set_tunnel_buffers

logger = logging.getLogger(__name__)

# close(): how long the tunnel may take to end by itself before its connections are shut down.
CLOSE_GRACE_SECONDS = 1.0

_STOP = object()
_EOF = object()


class TunnelEndpoint:
    """One end of a tunnel: pumps a local socket to N channels and back, in order."""

    def __init__(
        self,
        local: socket.socket,
        *,
        policy: codecs.AdaptivePolicy,
        control: TransferControl,
        tracker: ProgressTracker,
    ) -> None:
        self.local = local
        self.policy = policy
        self.control = control
        self.tracker = tracker
        self.outbound: queue.Queue[Any] = queue.Queue(maxsize=limits.TUNNEL_SEND_QUEUE_DEPTH)
        self.outbound_done = threading.Event()
        self.inbound_done = threading.Event()
        self.failed = threading.Event()
        self.failure: BaseException | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        # Outbound is done once the EOF and every DATA frame before it have gone out: a writer may
        # still be sending an earlier frame when another sends the EOF, and the END that follows
        # "done" must not overtake it on that writer's connection.
        self._frames_sent = 0
        self._eof_seq: int | None = None
        self._sent_lock = threading.Lock()
        self._reorder: dict[int, bytes | bytearray | memoryview | object] = {}
        self._next_seq = 0
        self._cond = threading.Condition()
        self._threads = [
            threading.Thread(target=self._pump, name="dwcp-tunnel-pump", daemon=True),
            threading.Thread(target=self._deliver, name="dwcp-tunnel-deliver", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    # -- failure ---------------------------------------------------------------------------------

    def fail(self, error: BaseException) -> None:
        with self._cond:
            if self.failure is None:
                self.failure = error
            self.failed.set()
            self._cond.notify_all()
        with contextlib.suppress(OSError):
            self.local.shutdown(socket.SHUT_RDWR)

    def _sent(self, *, eof_seq: int | None = None) -> None:
        """Count one DATA frame sent, or (with ``eof_seq``) the EOF that follows that many."""
        with self._sent_lock:
            if eof_seq is None:
                self._frames_sent += 1
            else:
                self._eof_seq = eof_seq
            if self._eof_seq is not None and self._frames_sent == self._eof_seq:
                self.outbound_done.set()

    @property
    def finished(self) -> bool:
        return self.outbound_done.is_set() and self.inbound_done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not (self.finished or self.failed.is_set()):
            if self.control.cancelled.is_set():
                self.fail(TransferCancelled("tunnel cancelled"))
                break
            if deadline is not None and time.monotonic() > deadline:
                return False
            self.failed.wait(0.05)
        return True

    # -- outbound --------------------------------------------------------------------------------

    def _pump(self) -> None:
        pool = codec_pool()
        seq = 0
        try:
            while not self.failed.is_set():
                data = self.local.recv(limits.TUNNEL_CHUNK_SIZE)
                if not data:
                    break
                self.bytes_out += len(data)
                self.outbound.put((seq, pool.submit(codecs.encode, data, self.policy.level)))
                seq += 1
            self.outbound.put((seq, _EOF))
        except OSError as exc:
            if not self.failed.is_set():
                self.fail(TransferError(f"local socket failed: {exc}", code="local_socket"))
        finally:
            self.outbound.put(_STOP)

    def write_channel(self, channel: Channel) -> None:
        """Writer loop for one channel (run in its own thread)."""
        while True:
            item = self.outbound.get()
            # Only the wait for the codec pool tells of a busy CPU. Waiting for the queue means the
            # local socket had nothing to send (QEMU producing slower than the link): no codec
            # helps then, and counting it made the policy drop to raw while the link was busy.
            started = time.monotonic()
            if item is _STOP:
                self.outbound.put(_STOP)
                return
            if self.failed.is_set():
                continue
            seq, payload = item
            try:
                if payload is _EOF:
                    channel.send(make_frame(FrameType.EOF, seq_or_offset=seq))
                    self._sent(eof_seq=seq)
                    continue
                future: Future[codecs.EncodedChunk] = payload
                chunk = future.result()
                ready = time.monotonic()
                frame = make_frame(
                    FrameType.DATA,
                    chunk.payload,
                    codec=chunk.codec,
                    seq_or_offset=seq,
                    raw_length=chunk.raw_length,
                    checksum=chunk.checksum,
                )
                self.control.bucket.acquire(HEADER_SIZE + frame.wire_length)
                wire = channel.send(frame)
                self._sent()
                self.policy.record(
                    starved_seconds=ready - started,
                    backlogged=channel.unsent_bytes() > limits.TUNNEL_LINK_BACKLOG_BYTES,
                )
                self.tracker.add(raw=chunk.raw_length, wire=wire, codec=chunk.codec.name.lower())
            except BaseException as exc:
                self.fail(exc)

    # -- inbound ---------------------------------------------------------------------------------

    def receive_frame(self, frame: Frame) -> None:
        """File a DATA or EOF frame from any channel into the reorder buffer (may wait)."""
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
                raise RemoteProtocolError(f"tunnel sequence number {seq} repeated")
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
                    self._next_seq += 1
                    self._cond.notify_all()
                if item is _EOF:
                    with contextlib.suppress(OSError):
                        self.local.shutdown(socket.SHUT_WR)
                    self.inbound_done.set()
                    return
                assert isinstance(item, bytes | bytearray | memoryview)
                self.local.sendall(item)
                self.bytes_in += len(item)
        except OSError as exc:
            self.fail(TransferError(f"local socket failed: {exc}", code="local_socket"))

    def read_channel(self, channel: Channel, *, responder: bool) -> None:
        """Reader loop for one channel until the transfer ends on it (END/RESULT) or fails."""
        try:
            while True:
                try:
                    frame = channel.receive()
                except TimeoutError:
                    if self.failed.is_set():
                        return
                    continue
                if frame is None:
                    raise TransferInterrupted("peer closed the tunnel connection")
                if frame.type in (FrameType.DATA, FrameType.EOF):
                    self.receive_frame(frame)
                elif frame.type is FrameType.END and responder:
                    # Answer only once everything from the peer reached the local socket: the
                    # session (and that socket) is torn down when the last stream has answered.
                    # Bounded: a local end that stops reading (the soak saw QEMU's NBD server do so
                    # after the switch) would otherwise hold this session, and its target, forever.
                    deadline = time.monotonic() + limits.TUNNEL_END_DRAIN_SECONDS
                    while not (self.inbound_done.wait(0.1) or self.failed.is_set()):
                        if time.monotonic() > deadline:
                            self.fail(TransferError("the local socket stopped reading", code="local_socket"))
                    if self.failed.is_set():
                        return
                    channel.send(control_frame(FrameType.RESULT, {"ok": True}))
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
        except (ProtocolError, OSError) as exc:
            if not self.failed.is_set():
                self.fail(TransferInterrupted(f"tunnel connection broke: {exc}"))
        except BaseException as exc:
            self.fail(exc)

    def close(self) -> None:
        if not self.failed.is_set():
            self.fail(TransferCancelled("tunnel closed"))
        with contextlib.suppress(OSError):
            self.local.close()
        for thread in self._threads:
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
        channels: list[Channel] = self._channels
        endpoint: TunnelEndpoint | None = None
        phase = "failed"
        try:
            primary = self._pool.acquire(self._address, self._secret, self._dest_node)
            channels.append(primary)
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
            session_key = accepted.text("session_key", max_length=64)
            granted = accepted.integer("streams", low=1, high=self._streams)
            for stream in range(1, granted):
                channel = self._pool.acquire(self._address, self._secret, self._dest_node)
                channels.append(channel)
                negotiate(
                    channel,
                    FrameType.ATTACH,
                    {"transfer_id": self.transfer_id, "session_key": session_key, "stream": stream},
                )
            caps = primary.protocol.capabilities
            policy = codecs.AdaptivePolicy(
                self._mode,
                writers=len(channels),
                allow_lz4=bool(caps & Capability.LZ4),
                allow_zstd=bool(caps & Capability.ZSTD),
            )
            tracker.phase = "transferring"
            endpoint = self._endpoint = TunnelEndpoint(
                local, policy=policy, control=self.control, tracker=tracker
            )
            if self._closing.is_set():  # close() ran while the streams were being opened
                endpoint.fail(TransferCancelled("tunnel closed"))
            threads = []
            for channel in channels:
                threads.append(threading.Thread(target=endpoint.write_channel, args=(channel,), daemon=True))
                threads.append(
                    threading.Thread(
                        target=endpoint.read_channel, args=(channel,), kwargs={"responder": False}
                    )
                )
            for channel in channels:
                set_tunnel_buffers(channel.sock, tunnel=True)
            for thread in threads:
                thread.daemon = True
                thread.start()
            endpoint.wait()
            if endpoint.failure is not None:
                raise endpoint.failure
            for channel in channels:
                channel.send(control_frame(FrameType.END, {}))
            for thread in threads:
                thread.join()
            if endpoint.failure is not None:
                raise endpoint.failure
            phase = "done"
            final = tracker.finish(phase)
            return TunnelResult(
                transfer_id=self.transfer_id,
                bytes_sent=endpoint.bytes_out,
                bytes_received=endpoint.bytes_in,
                wire_bytes=final.wire_bytes,
                seconds=time.monotonic() - started,
                streams=len(channels),
                codec_mix=final.codec_mix,
            )
        except (ProtocolError, OSError) as exc:
            raise TransferInterrupted(f"tunnel {self.transfer_id} interrupted: {exc}") from exc
        finally:
            if phase != "done":
                cancelled = self.control.cancelled.is_set() or self._closing.is_set()
                tracker.finish("cancelled" if cancelled else phase)
            if endpoint is not None:
                endpoint.close()
            for channel in channels:
                set_tunnel_buffers(channel.sock, tunnel=False)
                self._pool.release(channel, self._secret)

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
) -> Tunnel:
    """Listen on the unix socket ``local_path``; the first client to connect is joined, through
    the DWCP server at ``address``, to the unix socket the ticket's target names on that node.

    Returns at once (the socket is listening). ``Tunnel.wait()`` returns a ``TunnelResult`` once
    both directions reached EOF; ``Tunnel.close()`` cancels.
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
    )
