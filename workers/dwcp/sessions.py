"""Server-side transfer sessions: the state one transfer's streams share on the receiving node.

A session is created by the stream that sent OPEN; streams that ATTACH (or RESUME after a cut) join
it. Each stream's connection thread runs ``serve`` until END (or a failure) on that connection. The
last stream to leave releases the session, unless its link was cut: then a file transfer or a tunnel
waits for its sender's RESUME up to the outage limit. Released, a file transfer that did not finish
keeps its partial file and journal for a resume with a new ticket, a tunnel closes its local socket.
Failures are answered with an ERROR frame and a short linger, so the sender reads the reason
instead of a TCP reset.
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
from .errors import ChecksumMismatch, ConnectionLost, ProtocolError, RemoteProtocolError, TransferError
from .files import FileReceiver
from .frames import ControlMessage, FrameType, control_frame, parse_control
from .keepalive import LinkWatch
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
    def serve(self, channel: Channel, *, primary: bool, generation: int = 0) -> None:
        """Run one stream of this transfer until it ends on that connection."""


class FileSession(Session):
    """A file's receiving end. A cut link does not end it: once no stream is left it keeps the
    receiver (part file, journal, held chunks, their checksums) for ``outage_limit`` seconds, and the
    sender's RESUME (with the session key) starts a new generation of streams that sends only what is
    not held. Past the limit, or superseded by a new ticket for its target, it is released as an
    interrupted transfer (part file and journal kept for a resume with a new ticket). A failure (bad
    data, the sender's ERROR, a full disk) or a cancel ends it at once.
    """

    def __init__(
        self,
        ticket: Ticket,
        streams: int,
        on_released: Callable[[Session], None],
        receiver: FileReceiver,
        *,
        outage_limit: float = limits.TUNNEL_LINK_OUTAGE_SECONDS,
    ) -> None:
        super().__init__(ticket, streams, on_released)
        self.receiver = receiver
        self.outage_limit = outage_limit
        self.ended = 0  # secondary streams of the current generation that sent END
        self.finished = False
        self.finishing = False  # the primary verifies and renames: too late to resume
        self.generation = 0  # bumped by every resume; a stream of an older one is a dead connection
        self.cut_since: float | None = None  # monotonic start of the current outage (no stream left)
        self.outages: list[float] = []  # seconds each outage lasted, once resumed
        self._channels: dict[Channel, int] = {}  # stream connections -> their generation
        self.watch = LinkWatch(self._silent, position=lambda: receiver.held.held)

    def _silent(self, channel: Channel, quiet: float) -> None:
        logger.warning(
            "DWCP transfer %s: nothing heard from %s for %.1f s; closing that stream",
            self.ticket.transfer_id,
            self.ticket.source_node,
            quiet,
        )
        with contextlib.suppress(OSError):
            channel.sock.shutdown(socket.SHUT_RDWR)  # its reader sees the cut

    def waiting_for_resume(self) -> bool:
        """Called by ``leave`` (under ``cond``) when the last stream left: a transfer neither finished
        nor failed waits for its sender's RESUME; the first call starts the outage clock."""
        if self.finished or self.failed is not None:
            return False
        if self.cut_since is None:
            self.cut_since = time.monotonic()
            timer = threading.Timer(self.outage_limit, self._outage_expired, args=(self.generation,))
            timer.daemon = True
            timer.start()
            logger.warning(
                "DWCP transfer %s to %s: every stream lost with %d of %d chunks held; waiting up to %g s "
                "for a resume",
                self.ticket.transfer_id,
                self.ticket.target,
                self.receiver.held.held,
                self.receiver.count,
                self.outage_limit,
            )
        return True

    def _outage_expired(self, generation: int) -> None:
        with self.cond:
            down = time.monotonic() - (self.cut_since or 0.0)
            expired = (
                self.active == 0
                and self.generation == generation
                and self.cut_since is not None
                and not self._released
            )
            if expired:
                self.failed = f"link down for {down:.0f} s, above the limit of {self.outage_limit:g} s"
                self._released = True
        if expired:
            logger.warning("DWCP transfer %s: %s; given up", self.ticket.transfer_id, self.failed)
            self._release_now()

    def supersede(self, transfer_id: str) -> bool:
        """A new ticket for this session's target arrived: give a cut session up now (its sender died
        or gave up); True if released. A session with live streams is left alone."""
        return self.give_up(f"superseded by transfer {transfer_id}", only_if_cut=True)

    def give_up(self, reason: str, *, only_if_cut: bool = False) -> bool:
        """Stop waiting for a resume (the server stops, a new ticket supersedes it): released now if
        no stream is left (True), else when the last one leaves (unless ``only_if_cut``)."""
        with self.cond:
            if self._released or self.finished or (only_if_cut and (self.cut_since is None or self.active)):
                return False
            if self.failed is None:
                self.failed = reason
            idle = self.active == 0
            self._released = idle
            self.cond.notify_all()
        if idle:
            logger.warning(
                "DWCP transfer %s to %s given up while its link was cut: %s",
                self.ticket.transfer_id,
                self.ticket.target,
                reason,
            )
            self._release_now()
        return idle

    def resume(self, stream: int) -> int:
        """A stream of the sender comes back after a cut (the caller checked the session key); stream 0
        starts a new generation and closes what is left of the old one. Returns its generation; the
        caller then runs ``serve`` with it (and ``leave`` after)."""
        with self.cond:
            if self._released or self.finished or self.finishing or self.failed is not None:
                raise TransferError(
                    f"transfer {self.ticket.transfer_id} is over: {self.failed or 'finished'}",
                    code="unknown_session",
                )
            old: list[Channel] = []
            if stream == 0:
                self.generation += 1
                self.ended, self.attached = 0, 1
                old = [
                    channel for channel, generation in self._channels.items() if generation < self.generation
                ]
                if self.cut_since is not None:
                    self.outages.append(time.monotonic() - self.cut_since)
                    self.cut_since = None
            elif self.attached >= self.streams:
                raise TransferError(
                    f"transfer {self.ticket.transfer_id} has all its streams", code="too_many_streams"
                )
            else:
                self.attached += 1
            self.active += 1
            generation = self.generation
        for channel in old:  # the sender saw the cut before we did
            with contextlib.suppress(OSError):
                channel.sock.shutdown(socket.SHUT_RDWR)
        if stream == 0:
            logger.info(
                "DWCP transfer %s resumed (generation %d) with %d of %d chunks held",
                self.ticket.transfer_id,
                generation,
                self.receiver.held.held,
                self.receiver.count,
            )
        return generation

    def release(self) -> None:
        self.watch.stop()
        if not self.finished:
            self.receiver.suspend()
            logger.info(
                "DWCP transfer %s to %s stopped with %d of %d chunks held (resumable)",
                self.ticket.transfer_id,
                self.ticket.target,
                self.receiver.held.held,
                self.receiver.count,
            )

    def serve(self, channel: Channel, *, primary: bool, generation: int = 0) -> None:
        with self.cond:
            current = generation == self.generation
            if current:
                self._channels[channel] = generation
        if not current:
            return
        self.watch.add(channel)
        try:
            self._serve(channel, primary=primary, generation=generation)
        finally:
            self.watch.remove(channel)
            with self.cond:
                self._channels.pop(channel, None)

    def _serve(self, channel: Channel, *, primary: bool, generation: int) -> None:
        try:
            while True:
                try:
                    frame = self.watch.receive(channel)
                except TimeoutError:
                    if self.failed is not None:
                        raise TransferError(self.failed) from None
                    continue
                except (ConnectionLost, OSError) as exc:
                    self._stream_cut(exc)
                    return
                if frame is None:
                    self._stream_cut(ConnectionLost("the sender closed the connection"))
                    return
                if frame.type is FrameType.DATA:
                    self.receiver.write(frame)
                elif frame.type is FrameType.ACK:
                    continue  # the sender's keepalive
                elif frame.type is FrameType.END:
                    self._end(channel, parse_control(frame), primary=primary, generation=generation)
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
        except _StreamCut as exc:
            self._stream_cut(exc.__cause__ or exc)
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

    def _stream_cut(self, exc: BaseException) -> None:
        """A stream's connection broke: not the transfer's end (the sender resumes, or the outage
        limit ends it once no stream is left)."""
        if self.failed is None and not self.finished:
            logger.info("DWCP transfer %s: a stream's connection broke: %s", self.ticket.transfer_id, exc)

    def _end(self, channel: Channel, message: ControlMessage, *, primary: bool, generation: int) -> None:
        if not primary:
            with self.cond:
                if generation == self.generation:
                    self.ended += 1
                self.cond.notify_all()
            self._answer(channel, {"ok": True})
            return
        streams = message.integer("streams", low=1, high=limits.MAX_STREAMS)
        digest = message.text("digest", max_length=64)
        with self.cond:
            if not self.cond.wait_for(
                lambda: self.ended >= streams - 1 or self.failed is not None or generation != self.generation,
                limits.IO_TIMEOUT_SECONDS,
            ):
                raise _StreamCut("secondary streams never finished")
            if generation != self.generation:
                raise _StreamCut("the transfer resumed on other connections")
            if self.failed is not None:
                raise TransferError(self.failed)
            self.finishing = True
        self.receiver.finish(digest, codec_pool())
        self.finished = True
        logger.info(
            "DWCP transfer %s: %s verified (%d bytes, %d written, %d from base references, %d in a resume, "
            "%d outages survived)",
            self.ticket.transfer_id,
            self.ticket.target,
            self.receiver.spec.size,
            self.receiver.bytes_written,
            self.receiver.bytes_referenced,
            self.receiver.bytes_resumed,
            len(self.outages),
        )
        self._answer(channel, {"ok": True, "digest": digest})

    def _answer(self, channel: Channel, result: dict[str, object]) -> None:
        try:
            channel.send(control_frame(FrameType.RESULT, result))
        except OSError as exc:
            raise _StreamCut("the RESULT could not be sent") from exc


class _StreamCut(Exception):
    """One stream of a file session ended by its connection, not by a failure of the transfer."""


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
