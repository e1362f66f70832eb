"""The DWCP server a node runs: accepts authenticated connections and serves transfers on them.

One thread per connection (see ``transport`` for why threads). A connection authenticates once,
then carries any number of transfers one after the other (the client pools it). ``OPEN`` starts a
transfer with a ticket, verified against this node's name, the shared secret and the replay
guard; ``ATTACH`` adds a stream to an opened transfer, proven by the session key handed out in
``ACCEPT``; ``RESUME`` brings a cut tunnel's or file transfer's streams back, proven the same way
(see ``tunnel`` and ``sessions.FileSession``).
Refusals are answered with ``ERROR`` and logged; the connection stays usable.

File targets and tunnel sockets are confined to the server's root directories. A ``console`` ticket
(target: a VM uuid) is handed to the ``consoles`` provider, which returns a socket joined to that
VM's console as one more viewer; it is carried as a tunnel, and unlike files and tunnels several
sessions may hold the same console target at once (every viewer of one VM).

With TLS (``tls``; from ``DWCP_TLS_*`` by default) every connection runs a mutual TLS 1.3 handshake
before DWCP's; a peer whose certificate the CA did not sign, or that sends none, or speaks plain
DWCP, is refused there and logged, and the server goes on serving others. Tickets are verified as
without TLS, and the client certificate must also name the ticket's source node (``OPEN`` and
every ``ATTACH``): a node's certificate cannot carry a transfer signed for another node.

Connections still in their handshake (unauthenticated) have their own budget, a fraction of the
connection slots; when it is full the oldest is dropped, so peers that connect and never finish
(or finish byte by byte) cannot lock real peers out.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import socket
import ssl
import stat
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from . import limits
from .errors import (
    ConfigurationError,
    ProtocolError,
    RemoteProtocolError,
    TicketError,
    TLSMismatch,
    TransferError,
)
from .files import FileReceiver, IncomingFile, TargetRefused, resolve_target
from .frames import MAX_U64, ControlMessage, Frame, FrameType, control_frame, make_frame, parse_control
from .protocol import Capability, State
from .sender import codec_pool
from .sessions import FileSession, Session, TunnelSession
from .tickets import ReplayGuard, Ticket, secret_bytes, verify_ticket
from .tls import FROM_ENVIRONMENT, TLSSetting, describe_ssl_error, resolve
from .transport import Address, Channel, parse_address, tune_socket

logger = logging.getLogger(__name__)

# Connections still in their handshake. A real peer finishes in one round trip; when this many are
# pending the oldest is dropped to admit the newest, so a flood of silent or slow peers only ever
# evicts itself (refusing the newcomer instead would lock real peers out for up to
# HANDSHAKE_TIMEOUT_SECONDS after every flood). A quarter of MAX_CONNECTIONS: a flood can never hold
# the connection slots authenticated peers need.
MAX_PENDING_HANDSHAKES = limits.MAX_CONNECTIONS // 4
# Connections the kernel queues before accept(): room for a burst of a whole handshake budget, which
# the accept loop then sorts out, instead of SYNs dropped and retried a second later.
LISTEN_BACKLOG = 2 * MAX_PENDING_HANDSHAKES
# serve_forever() sleeps in slices this long. The kernel hands a process-wide SIGTERM to whichever
# thread it finds first; CPython then only runs the Python handler once the main thread executes
# bytecode again. Blocked for good in Event.wait(), the main thread never did, and a busy server
# ignored SIGTERM (the DWCP attack test's teardown timed out on a loaded CI host).
STOP_CHECK_SECONDS = 0.2


class ConsoleProvider(Protocol):
    """Who serves ``console`` tickets (the node's console manager): ``attach(vm_uuid)`` returns a
    connected socket carrying that VM's console for one viewer, or raises ``TransferError``."""

    def attach(self, vm_uuid: str) -> socket.socket: ...


def _linger_and_close(sock: socket.socket) -> None:
    """After a TLS refusal: FIN, not RST. Closing with the peer's hello unread would reset the
    connection and the client would see "connection reset" instead of our alert or a clean EOF,
    which it turns into an error naming TLS. Still counted as a pending handshake (evictable)."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + limits.ERROR_LINGER_SECONDS
        while (remaining := deadline - time.monotonic()) > 0:
            sock.settimeout(remaining)
            if not sock.recv(1 << 16):
                break
    sock.close()


class DWCPServer:
    """A DWCP listener: ``start()`` it (returns at once), ``stop()`` it; or use it as a context manager.

    ``root`` confines file targets (and base images); ``tunnel_root`` confines the unix sockets
    tunnels may reach (defaults to ``root``). ``listen`` may use port 0; ``address`` tells the
    port actually bound. ``tls``: a ``TLSConfig``, None for plain TCP, or ``FROM_ENVIRONMENT``
    (the default; a partial or unreadable ``DWCP_TLS_*`` set raises ``ConfigurationError`` here).
    ``consoles``: the provider of ``console`` tickets; without one they are refused.
    ``link_outage_seconds``: how long a tunnel or file transfer whose link was cut waits for its
    client to resume (plus ``TUNNEL_SERVER_OUTAGE_GRACE_SECONDS``: the client gives up first).
    """

    def __init__(
        self,
        *,
        listen: str | Address,
        root: str | os.PathLike[str],
        node_name: str,
        secret: str | bytes,
        tunnel_root: str | os.PathLike[str] | None = None,
        replay_guard: ReplayGuard | None = None,
        tls: TLSSetting = FROM_ENVIRONMENT,
        consoles: ConsoleProvider | None = None,
        link_outage_seconds: float = limits.TUNNEL_LINK_OUTAGE_SECONDS,
    ) -> None:
        self._listen = parse_address(listen) if isinstance(listen, str) else listen
        self.root = Path(root)
        self.tunnel_root = Path(tunnel_root) if tunnel_root is not None else self.root
        for directory in (self.root, self.tunnel_root):
            if not directory.is_dir():
                raise ConfigurationError(f"DWCP root {directory} is not a directory")
        if not node_name:
            raise ConfigurationError("DWCP server needs this node's name")
        self.node_name = node_name
        self._secret = secret_bytes(secret)
        self.tls = resolve(tls)
        self.replay_guard = replay_guard or ReplayGuard()
        self.consoles = consoles
        if link_outage_seconds <= 0:
            raise ConfigurationError("link_outage_seconds must be positive")
        self.link_outage_seconds = link_outage_seconds
        self._sessions: dict[str, Session] = {}
        self._targets: set[str] = set()
        self._lock = threading.Lock()
        self._channels: set[Channel] = set()
        self._handshaking: dict[socket.socket, Address] = {}  # oldest first
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._connection_slots = threading.BoundedSemaphore(limits.MAX_CONNECTIONS)
        self.connections_accepted = 0

    @property
    def address(self) -> Address:
        if self._listener is None:
            raise ConfigurationError("server not started")
        host, port = self._listener.getsockname()[:2]
        return host, port

    @property
    def address_text(self) -> str:
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def start(self) -> DWCPServer:
        infos = socket.getaddrinfo(self._listen[0], self._listen[1], type=socket.SOCK_STREAM)
        family, _, _, _, sockaddr = infos[0]
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tune_socket(listener)  # accepted sockets inherit buffers and congestion control
        listener.bind(sockaddr)
        listener.listen(LISTEN_BACKLOG)
        self._listener = listener
        self._thread = threading.Thread(target=self._accept_loop, name="dwcp-accept", daemon=True)
        self._thread.start()
        logger.info(
            "DWCP server for node %s listening on %s, root %s, %s",
            self.node_name,
            self.address_text,
            self.root,
            f"TLS 1.3 ({self.tls.description})" if self.tls is not None else "plain TCP",
        )
        return self

    def serve_forever(self) -> None:
        """Block until ``stop()``; a signal handler may call ``stop()`` (see STOP_CHECK_SECONDS)."""
        if self._listener is None:
            self.start()
        # is_set() takes no lock, so a handler calling stop() -> Event.set() never waits for a lock
        # this thread holds, as it could when the signal interrupts Event.wait().
        while not self._stopping.is_set():
            time.sleep(STOP_CHECK_SECONDS)

    def stop(self) -> None:
        self._stopping.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            channels = list(self._channels)
            pending = list(self._handshaking)
            file_sessions = [s for s in self._sessions.values() if isinstance(s, FileSession)]
        for (
            session
        ) in file_sessions:  # a stopped server is never resumed: keep part and journal for a new ticket
            session.give_up("the DWCP server stopped")
        for channel in channels:
            with contextlib.suppress(OSError):
                channel.sock.shutdown(socket.SHUT_RDWR)
            channel.close()
        for sock in pending:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # its thread sees EOF and closes it

    def active_transfers(self) -> list[str]:
        """Transfer ids currently running on this server."""
        with self._lock:
            return list(self._sessions)

    def __enter__(self) -> DWCPServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- connections -----------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                sock, peer = self._listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                logger.exception("DWCP accept failed")
                continue
            if not self._connection_slots.acquire(blocking=False):
                logger.warning(
                    "DWCP refused a connection from %s: %d connections open", peer[0], limits.MAX_CONNECTIONS
                )
                sock.close()
                continue
            with self._lock:
                evicted = None
                if len(self._handshaking) >= MAX_PENDING_HANDSHAKES:
                    evicted = next(iter(self._handshaking))
                    evicted_peer = self._handshaking.pop(evicted)
                self._handshaking[sock] = peer[:2]
            if evicted is not None:
                logger.warning(
                    "DWCP dropped the handshake of %s: %d handshakes pending",
                    evicted_peer[0],
                    MAX_PENDING_HANDSHAKES,
                )
                with contextlib.suppress(OSError):
                    evicted.shutdown(socket.SHUT_RDWR)  # its thread sees EOF and closes it
            self.connections_accepted += 1
            threading.Thread(
                target=self._serve_connection, args=(sock, peer[:2]), name="dwcp-conn", daemon=True
            ).start()

    def _serve_connection(self, sock: socket.socket, peer: Address) -> None:
        try:
            try:
                channel = Channel.accept(sock, peer, self._secret, self.tls)
            except ssl.SSLError as exc:
                logger.warning(
                    "DWCP TLS handshake with %s:%s failed: %s", peer[0], peer[1], describe_ssl_error(exc)
                )
                _linger_and_close(sock)
                return
            except TLSMismatch as exc:
                logger.warning("DWCP handshake with %s:%s failed: %s", peer[0], peer[1], exc)
                _linger_and_close(sock)
                return
            except (ProtocolError, OSError) as exc:
                logger.warning("DWCP handshake with %s:%s failed: %s", peer[0], peer[1], exc)
                sock.close()
                return
            finally:
                with self._lock:
                    self._handshaking.pop(sock, None)
            self._serve_authenticated(channel, peer)
        finally:
            self._connection_slots.release()

    def _serve_authenticated(self, channel: Channel, peer: Address) -> None:
        with self._lock:
            self._channels.add(channel)
        idle_since = time.monotonic()
        try:
            while not self._stopping.is_set():
                try:
                    frame = channel.receive()
                except TimeoutError:
                    if time.monotonic() - idle_since > limits.SERVER_IDLE_TIMEOUT_SECONDS:
                        return
                    continue
                if frame is None:
                    return
                if frame.type is FrameType.OPEN:
                    self._open(channel, frame)
                elif frame.type is FrameType.RESUME:
                    self._resume(channel, frame)
                else:  # the state machine allows only OPEN, ATTACH or RESUME on an idle connection
                    self._attach(channel, frame)
                if channel.state is not State.READY:
                    return
                idle_since = time.monotonic()
        except (ProtocolError, OSError) as exc:
            if not self._stopping.is_set():
                logger.warning("DWCP connection from %s:%s dropped: %s", peer[0], peer[1], exc)
        except Exception:  # a bug must cost one connection, not the server
            logger.exception("DWCP connection from %s:%s failed unexpectedly", peer[0], peer[1])
        finally:
            with self._lock:
                self._channels.discard(channel)
            channel.close()

    def _forget(self, session: Session) -> None:
        with self._lock:
            self._sessions.pop(session.ticket.transfer_id, None)
            if session.ticket.kind != "console":  # consoles never claimed their target
                self._targets.discard(session.ticket.target)

    def _refuse(self, channel: Channel, code: str, message: str) -> None:
        logger.warning("DWCP refused a transfer from %s: %s (%s)", channel.peer[0], message, code)
        channel.send(control_frame(FrameType.ERROR, {"code": code, "message": message}))

    def _open(self, channel: Channel, frame: Frame) -> None:
        request = parse_control(frame)
        try:
            ticket = verify_ticket(
                request.text("ticket", max_length=limits.MAX_TICKET_LENGTH),
                secret=self._secret,
                node_name=self.node_name,
                replay_guard=self.replay_guard,
            )
            session = self._create_session(channel, ticket, request)
        except TicketError as exc:
            self._refuse(channel, f"ticket_{exc.reason}", str(exc))
            return
        except (TransferError, RemoteProtocolError) as exc:
            self._refuse(channel, getattr(exc, "code", "bad_request"), str(exc))
            return
        session.enter()
        try:
            session.serve(channel, primary=True)
        finally:
            session.leave()

    @staticmethod
    def _check_certificate(channel: Channel, source_node: str) -> None:
        names = channel.peer_names
        if names is not None and source_node.lower() not in names:
            raise TransferError(
                f"ticket is for source {source_node!r}, the client's certificate names {sorted(names)}",
                code="wrong_source_certificate",
            )

    def _create_session(self, channel: Channel, ticket: Ticket, request: ControlMessage) -> Session:
        source_node = request.text("source_node", max_length=limits.MAX_NAME_LENGTH)
        if source_node != ticket.source_node:
            raise TransferError(
                f"ticket is for source {ticket.source_node!r}, sender says {source_node!r}",
                code="wrong_source",
            )
        self._check_certificate(channel, ticket.source_node)
        target = request.text("target", max_length=limits.MAX_TARGET_LENGTH)
        if target != ticket.target:
            raise TransferError(
                f"ticket is for target {ticket.target!r}, not {target!r}", code="wrong_target"
            )
        kind = request.text("kind", max_length=16)
        if kind != ticket.kind:
            raise TransferError(f"ticket is for a {ticket.kind}, not a {kind}", code="wrong_kind")
        streams = request.integer("streams", low=1, high=limits.MAX_STREAMS)
        exclusive = kind != "console"  # a VM's console has many viewers; a file or socket one user
        if exclusive:
            self._supersede_cut_holder(ticket)
        with self._lock:
            consoles = sum(1 for session in self._sessions.values() if session.ticket.kind == "console")
            if exclusive and len(self._sessions) - consoles >= limits.MAX_SESSIONS:
                raise TransferError("server is busy", code="busy")
            if not exclusive and consoles >= limits.MAX_CONSOLE_SESSIONS:
                raise TransferError(f"server holds {consoles} consoles, its most", code="busy")
            if exclusive and ticket.target in self._targets:
                raise TransferError(f"{ticket.target} is already being transferred", code="busy")
            if exclusive:
                self._targets.add(ticket.target)
        try:
            session: Session
            extra: dict[str, Any] = {}
            if kind == "file":
                session, extra = self._file_session(channel, ticket, request, streams)
            elif kind == "console":
                session = self._console_session(channel, ticket, streams)
            else:
                session = self._tunnel_session(channel, ticket, streams)
        except BaseException:
            if exclusive:
                with self._lock:
                    self._targets.discard(ticket.target)
            raise
        with self._lock:
            self._sessions[ticket.transfer_id] = session
        index = extra.pop("index_payload", b"")
        accept = {"session_key": session.session_key, "streams": streams, "transfer_id": ticket.transfer_id}
        channel.send(control_frame(FrameType.ACCEPT, accept | extra))
        if index:
            channel.send(make_frame(FrameType.INDEX, index))
        return session

    def _supersede_cut_holder(self, ticket: Ticket) -> None:
        """A signed ticket for a target that only a cut tunnel or file transfer holds (its client gone,
        maybe dead) releases that session at once: the VM's next migration must not wait for the
        outage limit (a file's part and journal stay, so the new transfer resumes from them)."""
        with self._lock:
            holders = [
                session
                for session in self._sessions.values()
                if session.ticket.target == ticket.target and isinstance(session, TunnelSession | FileSession)
            ]
        for holder in holders:
            holder.supersede(ticket.transfer_id)

    def _file_session(
        self, channel: Channel, ticket: Ticket, request: ControlMessage, streams: int
    ) -> tuple[Session, dict[str, Any]]:
        size = request.integer("size", low=0, high=limits.MAX_FILE_SIZE)
        chunk_size = request.integer("chunk_size", low=limits.MIN_CHUNK_SIZE, high=limits.MAX_CHUNK_SIZE)
        if chunk_size & (chunk_size - 1):
            raise RemoteProtocolError("chunk_size must be a power of two")
        if size // chunk_size > limits.MAX_CHUNKS_PER_FILE:
            raise TransferError("file has too many chunks; use larger chunks", code="too_large")
        base_name = request.optional_text("base")
        base = None
        if base_name is not None:
            if not channel.protocol.capabilities & Capability.REFERENCES:
                raise RemoteProtocolError("base references were not negotiated")
            base = resolve_target(self.root, base_name)
            if not base.is_file():
                raise TargetRefused(f"base {base_name!r} does not exist on node {self.node_name}")
        target = resolve_target(self.root, ticket.target)
        if target.exists() and not target.is_file():
            raise TargetRefused(f"target {ticket.target!r} exists and is not a regular file")
        spec = IncomingFile(
            target=target,
            size=size,
            chunk_size=chunk_size,
            source_id=request.text("source_id", max_length=64),
            base=base,
            resume=bool(channel.protocol.capabilities & Capability.RESUME),
        )
        receiver = FileReceiver(spec)
        index_payload = receiver.base_index(codec_pool()) if base is not None else b""
        held = receiver.held_ranges()
        if held:
            logger.info(
                "DWCP transfer %s resumes %s: %d of %d chunks already held",
                ticket.transfer_id,
                ticket.target,
                receiver.held.held,
                receiver.count,
            )
        outage_limit = self.link_outage_seconds + limits.TUNNEL_SERVER_OUTAGE_GRACE_SECONDS
        session = FileSession(ticket, streams, self._forget, receiver, outage_limit=outage_limit)
        return session, {"held": held, "index": bool(index_payload), "index_payload": index_payload}

    def _tunnel_session(self, channel: Channel, ticket: Ticket, streams: int) -> Session:
        if not channel.protocol.capabilities & Capability.TUNNEL:
            raise RemoteProtocolError("tunnels were not negotiated")
        path = resolve_target(self.tunnel_root, ticket.target)
        try:
            if not stat.S_ISSOCK(os.stat(path).st_mode):
                raise TargetRefused(f"tunnel target {ticket.target!r} is not a unix socket")
            local = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            local.connect(os.fspath(path))
        except OSError as exc:
            raise TargetRefused(f"cannot connect to tunnel target {ticket.target!r}: {exc}") from None
        return self._tunnel_over(local, channel, ticket, streams)

    def _console_session(self, channel: Channel, ticket: Ticket, streams: int) -> Session:
        if not channel.protocol.capabilities & Capability.TUNNEL:
            raise RemoteProtocolError("tunnels were not negotiated")
        if self.consoles is None:
            raise TargetRefused(f"node {self.node_name} serves no consoles")
        return self._tunnel_over(self.consoles.attach(ticket.target), channel, ticket, streams)

    def _tunnel_over(self, local: socket.socket, channel: Channel, ticket: Ticket, streams: int) -> Session:
        """The session carrying ``local`` (a target's socket, a console viewer's) as a tunnel."""
        caps = channel.protocol.capabilities
        outage_limit = self.link_outage_seconds + limits.TUNNEL_SERVER_OUTAGE_GRACE_SECONDS
        return TunnelSession(ticket, streams, self._forget, local, caps, outage_limit=outage_limit)

    def _attach(self, channel: Channel, frame: Frame) -> None:
        request = parse_control(frame)
        transfer_id = request.text("transfer_id", max_length=limits.MAX_NAME_LENGTH)
        key = request.text("session_key", max_length=64)
        with self._lock:
            session = self._sessions.get(transfer_id)
        if session is None or not hmac.compare_digest(session.session_key.encode(), key.encode()):
            self._refuse(channel, "unknown_session", f"no transfer {transfer_id} with that session key")
            return
        try:
            self._check_certificate(channel, session.ticket.source_node)
        except TransferError as exc:
            self._refuse(channel, exc.code, str(exc))
            return
        with session.cond:
            if session.attached >= session.streams or session.failed is not None:
                refused = True
            else:
                refused = False
                session.attached += 1
                session.active += 1
            generation = session.generation if isinstance(session, FileSession) else 0
        if refused:
            self._refuse(channel, "too_many_streams", f"transfer {transfer_id} has all its streams")
            return
        channel.send(control_frame(FrameType.ATTACHED, {}))
        try:
            session.serve(channel, primary=False, generation=generation)
        finally:
            session.leave()

    def _resume(self, channel: Channel, frame: Frame) -> None:
        """RESUME: a stream of a cut tunnel or file transfer comes back. Proven by the session key of
        its OPEN (and this connection's own handshake with the shared secret); stream 0 starts the new
        generation. A tunnel's ends then send again from what the other reports delivered; a file's
        sender learns the chunks held here (ATTACHED ``held``) and sends only the others."""
        request = parse_control(frame)
        transfer_id = request.text("transfer_id", max_length=limits.MAX_NAME_LENGTH)
        key = request.text("session_key", max_length=64)
        with self._lock:
            session = self._sessions.get(transfer_id)
        if session is None or not hmac.compare_digest(session.session_key.encode(), key.encode()):
            self._refuse(channel, "unknown_session", f"no transfer {transfer_id} to resume with that key")
            return
        if isinstance(session, FileSession):
            self._resume_file(channel, request, session)
        elif isinstance(session, TunnelSession) and not session.endpoint.failed.is_set():
            self._resume_tunnel(channel, request, session)
        else:
            self._refuse(channel, "unknown_session", f"transfer {transfer_id} cannot be resumed")

    def _resume_file(self, channel: Channel, request: ControlMessage, session: FileSession) -> None:
        try:
            self._check_certificate(channel, session.ticket.source_node)
            stream = request.integer("stream", low=0, high=session.streams - 1)
            generation = session.resume(stream)
        except (TransferError, RemoteProtocolError) as exc:
            self._refuse(channel, getattr(exc, "code", "bad_request"), str(exc))
            return
        try:
            answer = {"held": session.receiver.held_ranges()} if stream == 0 else {}
            channel.send(control_frame(FrameType.ATTACHED, answer))
            session.serve(channel, primary=stream == 0, generation=generation)
        finally:
            session.leave()

    def _resume_tunnel(self, channel: Channel, request: ControlMessage, session: TunnelSession) -> None:
        try:
            self._check_certificate(channel, session.ticket.source_node)
            stream = request.integer("stream", low=0, high=session.streams - 1)
            if stream == 0:
                generation = session.endpoint.resume(request.integer("next_seq", low=0, high=MAX_U64))
            else:
                generation = session.endpoint.generation
        except (TransferError, RemoteProtocolError) as exc:
            self._refuse(channel, getattr(exc, "code", "bad_request"), str(exc))
            return
        session.enter()
        try:
            channel.send(control_frame(FrameType.ATTACHED, {"next_seq": session.endpoint.delivered}))
            session.serve(channel, primary=stream == 0, generation=generation)
        finally:
            session.leave()
