"""Socket adapters around the sans-I/O ``protocol.Connection``: tuned TCP, channels, the pool.

Threads, not asyncio. Everything heavy in DWCP releases the GIL (``send``/``recv_into``,
``pread``/``pwrite``, lz4, zstd, xxh3, BLAKE2), so a handful of OS threads per transfer use every
core without an event loop re-entering Python per read; blocking sockets with bounded queues give
end-to-end backpressure for free (a full queue blocks the producer, a full socket blocks the
writer); and the embedding node worker is a synchronous Celery process that can start a server
thread or call ``send_file`` without owning a loop. Thread counts stay bounded by ``MAX_STREAMS``
and ``MAX_SESSIONS``.

A ``Channel`` is one authenticated TCP connection: it serialises writers, takes frames off the
socket reading exactly the bytes the state machine asks for (payloads land in their final buffer
without an extra copy), and knows whether it may go back to the ``ConnectionPool`` for reuse.

With TLS (``tls.TLSConfig``; see ``tls`` for the rules and the thread-safety argument) the channel
runs the TLS handshake right after TCP connect/accept, before DWCP's own; frames are then sealed by
a ``tls.TLSSession`` and sent with ``sendall`` (``SSLObject`` has no ``sendmsg``) and received
ciphertext is opened straight into the frame's buffer. ``self.sock`` stays the raw TCP socket, so
socket options, ``SIOCOUTQNSD`` and shutdown work the same in both modes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import select
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Sequence

from . import limits
from .errors import ConfigurationError, RemoteProtocolError, TLSError, TLSMismatch
from .frames import Frame
from .protocol import (
    ALL_CAPABILITIES,
    MAGIC,
    Capability,
    ConnectionClosed,
    HandshakeComplete,
    NeedData,
    Role,
    State,
)
from .protocol import (
    Connection as ProtocolConnection,
)
from .tls import (
    FROM_ENVIRONMENT,
    HANDSHAKE_FAILURE_ALERT,
    RECV_CHUNK_SIZE,
    TLS_RECORD_TYPES,
    TLSConfig,
    TLSSession,
    TLSSetting,
    describe_ssl_error,
    resolve,
)

logger = logging.getLogger(__name__)

Address = tuple[str, int]


def parse_address(text: str) -> Address:
    """``HOST:PORT`` or ``[V6]:PORT`` to a (host, port) tuple."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigurationError(f"address must be HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _available_congestion_controls() -> set[bytes]:
    try:
        with open("/proc/sys/net/ipv4/tcp_available_congestion_control", "rb") as handle:
            return set(handle.read().split())
    except OSError:
        return set()


AVAILABLE_CONGESTION_CONTROLS = _available_congestion_controls()


def _set_buffer(sock: socket.socket, forced: int, plain: int, size: int = limits.SOCKET_BUFFER_SIZE) -> None:
    # SO_*BUFFORCE (root) bypasses net.core.[rw]mem_max; otherwise the kernel caps the request.
    try:
        sock.setsockopt(socket.SOL_SOCKET, forced, size)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, plain, size)


SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)
SIOCOUTQNSD = 0x894B  # linux/sockios.h: bytes in the send queue not yet sent
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)


def tune_socket(sock: socket.socket) -> None:
    """Large buffers, BBR, keepalive, no Nagle; call before connect/listen so windows scale."""
    _set_buffer(sock, SO_SNDBUFFORCE, socket.SO_SNDBUF)
    _set_buffer(sock, SO_RCVBUFFORCE, socket.SO_RCVBUF)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, limits.KEEPALIVE_IDLE_SECONDS)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, limits.KEEPALIVE_INTERVAL_SECONDS)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, limits.KEEPALIVE_PROBES)
    # Tunnel frames are latency sensitive (NBD requests, migration handshakes); file frames are
    # large enough that Nagle would gain nothing.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, limits.NOTSENT_LOWAT_BYTES)
    if limits.PREFERRED_CONGESTION_CONTROL in AVAILABLE_CONGESTION_CONTROLS:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, limits.PREFERRED_CONGESTION_CONTROL)


def set_tunnel_buffers(sock: socket.socket, *, tunnel: bool) -> None:
    """Small buffers while a pooled connection carries a tunnel, the bulk ones again after."""
    size = limits.TUNNEL_SOCKET_BUFFER_SIZE if tunnel else limits.SOCKET_BUFFER_SIZE
    lowat = limits.TUNNEL_NOTSENT_LOWAT_BYTES if tunnel else limits.NOTSENT_LOWAT_BYTES
    user_timeout = limits.TUNNEL_TCP_USER_TIMEOUT_MS if tunnel else 0  # 0: the kernel's default
    with contextlib.suppress(OSError):  # a connection that just failed keeps what it had
        _set_buffer(sock, SO_SNDBUFFORCE, socket.SO_SNDBUF, size)
        _set_buffer(sock, SO_RCVBUFFORCE, socket.SO_RCVBUF, size)
        sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, lowat)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, user_timeout)


def congestion_control(sock: socket.socket) -> str:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\0").decode()


def _send_buffers(sock: socket.socket, buffers: Sequence[bytes | bytearray | memoryview]) -> None:
    views = [memoryview(b).cast("B") for b in buffers if len(b)]
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        if views and sent:
            views[0] = views[0][sent:]


RecvInto = Callable[[memoryview, int], int]


def _recv_exact(
    sock: socket.socket, count: int, deadline: float | None = None, recv_into: RecvInto | None = None
) -> bytearray:
    """Read ``count`` bytes (fewer at EOF). With a ``deadline`` (monotonic) every read is bounded by
    it, partial ones too: a peer trickling bytes cannot stretch a handshake past its deadline.
    ``recv_into`` replaces ``sock.recv_into`` (TLS); timeouts stay those of ``sock``."""
    recv_into = recv_into or sock.recv_into
    buffer = bytearray(count)
    view = memoryview(buffer)
    received = 0
    while received < count:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("deadline passed")
            sock.settimeout(remaining)
        try:
            got = recv_into(view[received:], count - received)
        except TimeoutError:
            if received == 0 or deadline is not None:
                raise  # nothing consumed (the caller may wait again), or past the deadline
            continue  # mid-frame: keep reading; TCP keepalive notices a dead peer

        if got == 0:
            view.release()
            del buffer[received:]
            break
        received += got
    return buffer


class Channel:
    """One authenticated DWCP connection over a blocking TCP socket, in TLS when ``tls`` is set."""

    def __init__(
        self,
        sock: socket.socket,
        protocol: ProtocolConnection,
        peer: Address,
        tls: TLSSession | None = None,
        server_name: str | None = None,
    ) -> None:
        self.sock = sock
        self.protocol = protocol
        self.peer = peer
        self.tls = tls
        self.server_name = server_name  # client side: the node name the server had to prove
        self.idle_since = time.monotonic()
        self._send_lock = threading.Lock()
        self._state_lock = threading.Lock()

    # -- establishing ----------------------------------------------------------------------------

    @classmethod
    def connect(
        cls,
        address: Address,
        secret: bytes,
        *,
        capabilities: Capability = ALL_CAPABILITIES,
        timeout: float = limits.HANDSHAKE_TIMEOUT_SECONDS,
        tls: TLSConfig | None = None,
        server_name: str | None = None,
    ) -> Channel:
        """Connect and authenticate. With ``tls`` the server's certificate must name
        ``server_name`` (the destination node; the dialled host when None). TLS failures raise
        ``TLSError`` saying which side refused what."""
        host, port = address
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, sockaddr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        deadline = time.monotonic() + timeout
        session = None
        if tls is not None:
            session = TLSSession(tls.client_context, server_side=False, server_hostname=server_name or host)
        try:
            tune_socket(sock)
            sock.settimeout(timeout)
            sock.connect(sockaddr)
            protocol = ProtocolConnection(Role.INITIATOR, secret, capabilities=capabilities)
            channel = cls(sock, protocol, address, session, server_name)
            try:
                if session is not None:
                    channel._tls_handshake(timeout, deadline)
                channel._send_bytes(protocol.initiate())
                channel._finish_handshake(timeout, deadline)
            except ssl.SSLError as exc:
                peer = f"{host}:{port}" + (f" (node {server_name})" if server_name else "")
                raise TLSError(f"TLS with {peer} failed: {describe_ssl_error(exc)}") from exc
            sock.settimeout(limits.IO_TIMEOUT_SECONDS)
            return channel
        except BaseException:
            sock.close()
            raise

    @classmethod
    def accept(
        cls, sock: socket.socket, peer: Address, secret: bytes, tls: TLSConfig | None = None
    ) -> Channel:
        """Server side: run the handshake(s) on an accepted socket (raises on failure; a TLS
        failure is an ``ssl.SSLError`` after the alert went to the peer)."""
        timeout = limits.HANDSHAKE_TIMEOUT_SECONDS
        deadline = time.monotonic() + timeout
        sock.settimeout(timeout)
        session = TLSSession(tls.server_context, server_side=True) if tls is not None else None
        channel = cls(sock, ProtocolConnection(Role.RESPONDER, secret), peer, session)
        if session is not None:
            first = sock.recv(len(MAGIC), socket.MSG_PEEK)
            if first and MAGIC.startswith(first):
                with contextlib.suppress(OSError):
                    sock.sendall(HANDSHAKE_FAILURE_ALERT)
                raise TLSMismatch("plain DWCP client refused: this server requires TLS (DWCP_TLS_*)")
            channel._tls_handshake(timeout, deadline)
        channel._finish_handshake(timeout, deadline)
        sock.settimeout(limits.IO_TIMEOUT_SECONDS)
        return channel

    def _tls_handshake(self, timeout: float, deadline: float) -> None:
        assert self.tls is not None
        while True:
            try:
                done, output = self.tls.handshake_step()
            except ssl.SSLError:
                with contextlib.suppress(OSError):  # tell the peer why (an alert), if it listens
                    self.sock.sendall(self.tls.pending_output())
                raise
            if output:
                self.sock.sendall(output)
            if done:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RemoteProtocolError(f"TLS handshake took longer than {timeout:g} s")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(RECV_CHUNK_SIZE)
            except TimeoutError:
                raise RemoteProtocolError(f"TLS handshake took longer than {timeout:g} s") from None
            self.tls.feed(data)

    def _finish_handshake(self, timeout: float, deadline: float) -> HandshakeComplete:
        """The whole handshake, every partial read included, must end by ``deadline``."""
        first_read = True
        while True:
            event = self.protocol.next_event()
            outgoing = self.protocol.data_to_send()
            if outgoing:
                self._send_bytes(outgoing)
            if isinstance(event, HandshakeComplete):
                return event
            if isinstance(event, ConnectionClosed):
                hint = "" if self.tls is not None else " (if it requires TLS, set DWCP_TLS_CERT/KEY/CA here)"
                raise RemoteProtocolError(f"peer closed the connection during the handshake{hint}")
            assert isinstance(event, NeedData)
            try:
                data = self._recv(event.count, deadline)
            except TimeoutError:
                raise RemoteProtocolError(f"handshake took longer than {timeout:g} s") from None
            if first_read and self.tls is None and self.protocol.role is Role.INITIATOR:
                self._refuse_plain_answer(data)
            first_read = False
            self.protocol.receive_data(data)

    def _refuse_plain_answer(self, data: bytes | bytearray) -> None:
        """Plain client: a TLS server answers a DWCP hello with a TLS alert or by closing."""
        if data[:1] and data[0] in TLS_RECORD_TYPES and data[1:2] == b"\x03":
            raise TLSError(
                f"{self.peer[0]}:{self.peer[1]} answered with TLS: it requires TLS and this side has no "
                "DWCP_TLS_CERT/KEY/CA settings"
            )
        if not data:
            raise RemoteProtocolError(
                f"{self.peer[0]}:{self.peer[1]} closed the connection during the handshake (a server that "
                "requires TLS does so with a plain client: set DWCP_TLS_CERT/KEY/CA here if it does)"
            )

    # -- bytes -----------------------------------------------------------------------------------

    def _send_bytes(self, data: bytes) -> None:
        self.sock.sendall(self.tls.seal((data,)) if self.tls is not None else data)

    def _tls_recv_into(self, view: memoryview, count: int) -> int:
        assert self.tls is not None
        target = view[:count]
        while True:
            got = self.tls.read_into(target)
            if got is not None:
                return got
            # A timeout here leaves the TLS state as it was: the caller may simply read again.
            self.tls.feed(self.sock.recv(RECV_CHUNK_SIZE))

    def _recv(self, count: int, deadline: float | None = None) -> bytes | bytearray:
        recv_into = self._tls_recv_into if self.tls is not None else None
        return _recv_exact_or_eof(self.sock, count, deadline, recv_into)

    @property
    def peer_names(self) -> set[str] | None:
        """Names in the peer's verified TLS certificate; None on a plain connection."""
        return self.tls.peer_names if self.tls is not None else None

    # -- frames ----------------------------------------------------------------------------------

    def send(self, frame: Frame) -> int:
        """Send one frame; returns the bytes it took on the wire."""
        with self._send_lock:
            return self._send_locked(frame)

    def try_send(self, frame: Frame) -> bool:
        """Send a small ``frame`` unless that could block: another thread is sending on this channel,
        or the socket is not writable (its unsent bytes above the low-water mark, a peer or a link that
        stopped taking them). For a tunnel's ACKs and keepalives, whose thread also watches the link
        and must never hang on it."""
        if not self._send_lock.acquire(blocking=False):
            return False
        try:
            poller = select.poll()  # not select(): a busy server's descriptors pass 1024
            poller.register(self.sock, select.POLLOUT)
            if not any(events & select.POLLOUT for _, events in poller.poll(0)):
                return False
            self._send_locked(frame)
            return True
        finally:
            self._send_lock.release()

    def _send_locked(self, frame: Frame) -> int:
        with self._state_lock:
            header, payload = self.protocol.send(frame)
        if self.tls is None:
            _send_buffers(self.sock, (header, payload))
        else:
            self.sock.sendall(self.tls.seal((header, payload)))
        return len(header) + len(payload)

    def receive(self) -> Frame | None:
        """Next frame from the peer; None when it closed the connection cleanly while idle."""
        while True:
            with self._state_lock:
                event = self.protocol.next_event()
            if isinstance(event, Frame):
                return event
            if isinstance(event, ConnectionClosed):
                return None
            assert isinstance(event, NeedData)
            data = self._recv(event.count)
            with self._state_lock:
                self.protocol.receive_data(data)

    def unsent_bytes(self) -> int:
        """Bytes written to the socket that TCP has not sent yet (SIOCOUTQNSD)."""
        result = fcntl.ioctl(self.sock.fileno(), SIOCOUTQNSD, b"\0\0\0\0")
        return int.from_bytes(result, sys.byteorder, signed=True)

    @property
    def state(self) -> State:
        return self.protocol.state

    def reusable(self) -> bool:
        """Idle, authenticated and (as far as a non-blocking peek can tell) still connected."""
        if self.protocol.state is not State.READY:
            return False
        if self.tls is not None and self.tls.buffered():
            return False
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return False
        # Readable while idle means EOF, or bytes nobody asked for: drop the connection either way.
        return not readable

    def close(self) -> None:
        self.protocol.close()
        # shutdown first: close() alone neither wakes a thread blocked in recv on this socket
        # nor sends the peer a FIN while that thread still holds the file.
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.sock.close()


def _recv_exact_or_eof(
    sock: socket.socket, count: int, deadline: float | None = None, recv_into: RecvInto | None = None
) -> bytes | bytearray:
    data = _recv_exact(sock, count, deadline, recv_into)
    if len(data) < count:
        # A short read means EOF: hand over what came, then the end marker on the next call.
        return bytes(data) if data else b""
    return data


PoolKey = tuple[Address, bytes, str | None]


class ConnectionPool:
    """Idle authenticated channels per (peer, secret, server name), reused by later transfers.

    ``tls``: a ``TLSConfig``, None for plain TCP, or ``FROM_ENVIRONMENT`` (the default), read from
    ``DWCP_TLS_*`` at the first connection (so importing DWCP never fails on settings).
    """

    def __init__(self, *, tls: TLSSetting = FROM_ENVIRONMENT) -> None:
        self._idle: dict[PoolKey, list[Channel]] = {}
        self._lock = threading.Lock()
        self._tls_setting = tls
        self._tls: TLSConfig | None = None
        self._tls_resolved = False
        self.connects = 0
        self.reuses = 0

    @property
    def tls(self) -> TLSConfig | None:
        with self._lock:
            if not self._tls_resolved:
                self._tls = resolve(self._tls_setting)
                self._tls_resolved = True
            return self._tls

    @staticmethod
    def _key(address: Address, secret: bytes, server_name: str | None) -> PoolKey:
        return address, hashlib.sha256(secret).digest(), server_name

    def acquire(
        self,
        address: Address,
        secret: bytes,
        server_name: str | None = None,
        *,
        timeout: float = limits.HANDSHAKE_TIMEOUT_SECONDS,
    ) -> Channel:
        """An idle channel to ``address`` or a new one (connected within ``timeout``). ``server_name``
        is the node the server must prove to be under TLS (the ticket's destination)."""
        tls = self.tls
        key = self._key(address, secret, server_name)
        now = time.monotonic()
        while True:
            with self._lock:
                idle = self._idle.get(key, [])
                channel = idle.pop() if idle else None
            if channel is None:
                break
            if now - channel.idle_since < limits.POOL_IDLE_SECONDS and channel.reusable():
                self.reuses += 1
                return channel
            channel.close()
        self.connects += 1
        return Channel.connect(address, secret, tls=tls, server_name=server_name, timeout=timeout)

    def release(self, channel: Channel, secret: bytes) -> None:
        """Give back a channel after a transfer; it is closed unless idle and healthy."""
        if not channel.reusable():
            channel.close()
            return
        channel.idle_since = time.monotonic()
        key = self._key(channel.peer, secret, channel.server_name)
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if len(idle) < limits.POOL_MAX_IDLE_PER_PEER:
                idle.append(channel)
                return
        channel.close()

    def close(self) -> None:
        with self._lock:
            channels = [channel for idle in self._idle.values() for channel in idle]
            self._idle.clear()
        for channel in channels:
            channel.close()


_default_pool = ConnectionPool()


def default_pool() -> ConnectionPool:
    """The process-wide pool ``send_file`` and ``open_tunnel`` use unless given another."""
    return _default_pool


def reconnect_backoff(
    what: str, peer: str, error: BaseException, delay: float, stop: threading.Event
) -> float:
    """A reconnect after a cut failed: log it, wait ``delay`` seconds (less if ``stop`` is set) and
    return the next delay (doubling up to ``TUNNEL_RECONNECT_BACKOFF_MAX_SECONDS``)."""
    logger.info("DWCP %s: reconnecting to %s failed (%s); retrying in %.2f s", what, peer, error, delay)
    stop.wait(delay)
    return min(2 * delay, limits.TUNNEL_RECONNECT_BACKOFF_MAX_SECONDS)
