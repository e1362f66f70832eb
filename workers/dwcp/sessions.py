"""Server-side transfer sessions: the state one transfer's streams share on the receiving node.

A session is created by the stream that sent OPEN; streams that ATTACH join it. Each stream's
connection thread runs ``serve`` until END (or a failure) on that connection. The last stream to
leave releases the session: a file transfer that did not finish keeps its partial file and journal
for a resume, a tunnel closes its local socket. Failures are answered with an ERROR frame and a
short linger, so the sender reads the reason instead of a TCP reset.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable

from . import codecs, limits
from .control import TransferControl
from .errors import ChecksumMismatch, ProtocolError, RemoteProtocolError, TransferError
from .files import FileReceiver
from .frames import ControlMessage, FrameType, control_frame, parse_control
from .progress import ProgressTracker
from .protocol import Capability, State
from .sender import codec_pool
from .tickets import Ticket
from .transport import Channel, set_tunnel_buffers
from .tunnel import TunnelEndpoint

logger = logging.getLogger(__name__)


def send_error(channel: Channel, code: str, message: str) -> None:
    with contextlib.suppress(OSError, ProtocolError):
        channel.send(control_frame(FrameType.ERROR, {"code": code, "message": message}))


def linger_and_close(channel: Channel) -> None:
    """After a fatal ERROR: read and drop what is in flight so the peer sees our frame, not a reset."""
    with contextlib.suppress(OSError):
        channel.sock.shutdown(socket.SHUT_WR)
        channel.sock.settimeout(limits.ERROR_LINGER_SECONDS)
        deadline = time.monotonic() + limits.ERROR_LINGER_SECONDS
        while time.monotonic() < deadline and channel.sock.recv(1 << 20):
            pass
    channel.close()


class Session(abc.ABC):
    """State shared by the streams of one transfer on this server."""

    def __init__(self, ticket: Ticket, streams: int, on_released: Callable[[Session], None]) -> None:
        self.on_released = on_released
        self.ticket = ticket
        self.streams = streams
        self.session_key = secrets.token_hex(16)
        self.attached = 1
        self.active = 0
        self.cond = threading.Condition()
        self.failed: str | None = None
        self._released = False

    def enter(self) -> None:
        with self.cond:
            self.active += 1

    def leave(self) -> None:
        with self.cond:
            self.active -= 1
            last = self.active == 0 and not self.waiting_for_resume() and not self._released
            self._released = self._released or last
            self.cond.notify_all()
        if last:
            self._release_now()

    def _release_now(self) -> None:
        try:
            self.release()
        finally:
            self.on_released(self)  # only now may a new transfer claim the same target

    def waiting_for_resume(self) -> bool:
        """No stream is attached, but the transfer waits for its peer to come back (kept)."""
        return False

    @abc.abstractmethod
    def release(self) -> None:
        """Free the session's resources once no stream uses them."""

    def fail(self, reason: str) -> None:
        with self.cond:
            if self.failed is None:
                self.failed = reason
            self.cond.notify_all()

    @abc.abstractmethod
    def serve(self, channel: Channel, *, primary: bool) -> None:
        """Run one stream of this transfer until it ends on that connection."""


class FileSession(Session):
    def __init__(
        self, ticket: Ticket, streams: int, on_released: Callable[[Session], None], receiver: FileReceiver
    ) -> None:
        super().__init__(ticket, streams, on_released)
        self.receiver = receiver
        self.ended = 0
        self.finished = False

    def release(self) -> None:
        if not self.finished:
            self.receiver.suspend()
            logger.info(
                "DWCP transfer %s to %s stopped with %d of %d chunks held (resumable)",
                self.ticket.transfer_id,
                self.ticket.target,
                self.receiver.held.held,
                self.receiver.count,
            )

    def serve(self, channel: Channel, *, primary: bool) -> None:
        try:
            while True:
                try:
                    frame = channel.receive()
                except TimeoutError:
                    if self.failed is not None:
                        raise TransferError(self.failed) from None
                    continue
                if frame is None:
                    raise TransferError("sender closed the connection mid-transfer", code="interrupted")
                if frame.type is FrameType.DATA:
                    self.receiver.write(frame)
                elif frame.type is FrameType.END:
                    self._end(channel, parse_control(frame), primary=primary)
                    return
                elif frame.type is FrameType.CANCEL:
                    self.finished = True
                    self.receiver.discard()
                    logger.info("DWCP transfer %s cancelled by the sender", self.ticket.transfer_id)
                    channel.send(control_frame(FrameType.RESULT, {"ok": False, "cancelled": True}))
                    return
                elif frame.type is FrameType.ERROR:
                    raise TransferError(f"sender failed: {parse_control(frame).fields.get('message')}")
                else:
                    raise RemoteProtocolError(f"unexpected {frame.type.name} during a file transfer")
        except (ChecksumMismatch, RemoteProtocolError, TransferError, OSError) as exc:
            code = (
                "checksum_mismatch" if isinstance(exc, ChecksumMismatch) else getattr(exc, "code", "failed")
            )
            logger.warning(
                "DWCP transfer %s to %s failed: %s", self.ticket.transfer_id, self.ticket.target, exc
            )
            self.fail(str(exc))
            send_error(channel, code, str(exc))
            linger_and_close(channel)

    def _end(self, channel: Channel, message: ControlMessage, *, primary: bool) -> None:
        if not primary:
            with self.cond:
                self.ended += 1
                self.cond.notify_all()
            channel.send(control_frame(FrameType.RESULT, {"ok": True}))
            return
        streams = message.integer("streams", low=1, high=limits.MAX_STREAMS)
        digest = message.text("digest", max_length=64)
        with self.cond:
            if not self.cond.wait_for(
                lambda: self.ended >= streams - 1 or self.failed is not None, limits.IO_TIMEOUT_SECONDS
            ):
                raise TransferError("secondary streams never finished", code="interrupted")
            if self.failed is not None:
                raise TransferError(self.failed)
        self.receiver.finish(digest, codec_pool())
        self.finished = True
        logger.info(
            "DWCP transfer %s: %s verified (%d bytes, %d written, %d from base references, %d in a resume)",
            self.ticket.transfer_id,
            self.ticket.target,
            self.receiver.spec.size,
            self.receiver.bytes_written,
            self.receiver.bytes_referenced,
            self.receiver.bytes_resumed,
        )
        channel.send(control_frame(FrameType.RESULT, {"ok": True, "digest": digest}))


class TunnelSession(Session):
    """A tunnel's server end. A cut link does not end it: with no stream attached it keeps its local
    socket and replay window until the client sends RESUME, the outage limit fails it, or a new
    ticket for the same target supersedes it (a source that died will never resume)."""

    def __init__(
        self,
        ticket: Ticket,
        streams: int,
        on_released: Callable[[Session], None],
        local: socket.socket,
        caps: Capability,
        *,
        outage_limit: float = limits.TUNNEL_LINK_OUTAGE_SECONDS,
    ):
        super().__init__(ticket, streams, on_released)
        policy = codecs.AdaptivePolicy(
            codecs.CodecMode.AUTO,
            writers=streams,
            allow_lz4=bool(caps & Capability.LZ4),
            allow_zstd=bool(caps & Capability.ZSTD),
        )
        tracker = ProgressTracker(ticket.transfer_id, total_bytes=None)
        self.endpoint = TunnelEndpoint(
            local,
            policy=policy,
            control=TransferControl(),
            tracker=tracker,
            outage_limit=outage_limit,
            peer=ticket.source_node,
            on_failed=self._endpoint_failed,
        )

    def waiting_for_resume(self) -> bool:
        return self.endpoint.cut

    def _endpoint_failed(self) -> None:
        """The endpoint failed (outage limit, superseded): release at once if no stream holds it."""
        with self.cond:
            idle = self.active == 0 and not self._released
            self._released = self._released or idle
        if idle:
            self._release_now()

    def supersede(self, transfer_id: str) -> bool:
        """A new ticket for this session's target arrived: give a cut session up now (its peer
        died or gave up); True if released. A session with live streams is left alone."""
        if not self.endpoint.cut:
            return False
        logger.warning(
            "DWCP tunnel %s to %s superseded by transfer %s while its link was cut",
            self.ticket.transfer_id,
            self.ticket.target,
            transfer_id,
        )
        self.endpoint.fail(TransferError(f"superseded by transfer {transfer_id}", code="superseded"))
        return True

    def serve(self, channel: Channel, *, primary: bool, generation: int = 0) -> None:
        self.endpoint.add_channel(channel, generation)
        try:
            self.endpoint.read_channel(channel, generation, responder=True)
        finally:
            set_tunnel_buffers(channel.sock, tunnel=False)
        if self.endpoint.failure is not None and channel.state is not State.READY:
            send_error(channel, "tunnel_failed", str(self.endpoint.failure))
            linger_and_close(channel)
            self.fail(str(self.endpoint.failure))

    def release(self) -> None:
        self.endpoint.close()
        logger.info(
            "DWCP tunnel %s to %s closed (%d bytes in, %d bytes out, %d resent, %d outages)",
            self.ticket.transfer_id,
            self.ticket.target,
            self.endpoint.bytes_in,
            self.endpoint.bytes_out,
            self.endpoint.bytes_resent,
            len(self.endpoint.outages),
        )
