"""DWCP, NovaCron's node-to-node transfer protocol: disk images and tunnelled byte streams.

Public API (everything else in this package is internal)::

    # control plane: mint a ticket for one transfer (pure Python, no Django). For kind="file"
    # the target is the path under the receiver's root the sender must ask for; for
    # kind="tunnel" it is the unix socket, relative to the receiver's tunnel_root, to connect to;
    # for kind="console" it is a VM uuid, served by the server's ``consoles`` provider (one more
    # viewer of that VM's serial console; opened with open_tunnel as a tunnel is)
    sign_ticket(*, secret, source_node, dest_node, kind: "file" | "tunnel" | "console", target,
                transfer_id=None, ttl_seconds=300) -> str
    verify_ticket(token, *, secret, node_name, replay_guard=None) -> Ticket   # raises TicketError

    # node worker: run the server (returns at once; stop() to shut down; also a context manager)
    server = DWCPServer(listen="0.0.0.0:7400", root="/var/lib/novacron", node_name="node-2",
                        secret=secret, tunnel_root=None,    # tunnel_root defaults to root
                        consoles=None,                      # a ConsoleProvider: attach(vm_uuid) -> socket
                        link_outage_seconds=120)            # how long a cut tunnel or file waits for RESUME
    server.start(); server.active_transfers() -> list[str]; server.stop()

    # source side: send a file or block device; blocks until the receiver verified the
    # whole-file digest and renamed it into place; name must equal the ticket's target
    send_file(path, *, address="node-2:7400", name="vms/42/disk.qcow2", ticket=token,
              secret=secret, source_node="node-1", streams=4, codec="auto" | "lz4" | "zstd" | "raw",
              chunk_size=1 MiB, base=None, control=None, reporter=None, pool=None,
              link_outage_seconds=120) -> TransferResult
    # TransferResult: transfer_id, raw_bytes, wire_bytes, seconds, streams, codec_mix, digest,
    # resumed_bytes, bytes_resent, outages; base names a file under the receiver's root whose equal
    # chunks go as references. A cut link (connections broken, or silent 4 s: both ends send ACK
    # keepalives) is reconnected and the transfer resumed in this same call for up to
    # link_outage_seconds (protocol version 3: RESUME with the session key of the ACCEPT, answered
    # with the chunks the receiver holds; only the others are sent again), progress phase
    # "reconnecting" with outage_seconds meanwhile; past it TransferInterrupted, code "link_outage"

    # migrations: listen on a local unix socket; its first client is joined to the ticket's
    # socket on the peer (one connection per tunnel, both directions, order preserved)
    tunnel = open_tunnel(address="node-2:7400", local_path="/run/novacron/vm42-mig.sock",
                         ticket=token, secret=secret, source_node="node-1", streams=4,
                         codec="auto", control=None, reporter=None, pool=None,
                         link_outage_seconds=120, replay_window=32 MiB)
    # point QEMU at unix:/run/novacron/vm42-mig.sock; a cut link is reconnected and resumed from
    # the last acknowledged frame (protocol version 2: ACK, RESUME) for up to link_outage_seconds,
    # progress phase "reconnecting" with outage_seconds meanwhile; then
    tunnel.accepted; tunnel.ended                # the peer took the ticket; the tunnel is over
    tunnel.wait(timeout=None) -> TunnelResult   # after both directions reached EOF
    tunnel.close()                              # tears down this tunnel only
    tunnel.failure                               # why it failed (code "link_outage": the limit)
    # TunnelResult also has bytes_resent and outages (seconds each cut lasted)

    # live control of running transfers (may be shared), from any thread
    control = TransferControl(bandwidth_limit_mbps=None)
    control.set_bandwidth_limit(200); control.cancel()

    # progress, at most 5 updates/s, to any Reporter (report(progress: Progress) -> None):
    # RedisProgressReporter(redis_client, key_prefix="novacron:dwcp:") writes the hash
    # <prefix><transfer_id> and publishes the same JSON on <prefix><transfer_id>:events;
    # CallbackReporter(fn) and TerminalReporter() are the others

    # optional mutual TLS 1.3 (see tls.py): by default servers and pools read DWCP_TLS_CERT,
    # DWCP_TLS_KEY, DWCP_TLS_CA (all or none); or pass tls=TLSConfig.load(cert=, key=, ca=) / None
    DWCPServer(..., tls=...); ConnectionPool(tls=...)   # hand the pool to send_file/open_tunnel

Errors: ``TicketError`` (refused ticket), ``TLSError`` (TLS refused: certificate, peer name, one
side without TLS), ``TransferRefused``, ``TransferInterrupted`` (the link stayed cut past the
limit, code "link_outage", or the receiver refused the resume, code "resume_refused"; a later
``send_file`` with a new ticket still resumes: the receiver reports what it holds in its journal and
only the rest is sent), ``TransferCancelled``, ``TransferError`` (base, with ``code``); protocol
violations are ``LocalProtocolError`` / ``RemoteProtocolError`` (both ``ProtocolError``).

Layout: ``frames``/``protocol`` are the sans-I/O core (wire format, handshake, state machine),
``limits`` holds every bound, ``codecs`` the per-chunk codecs and adaptive policy, ``transport``
the socket adapters and pool, ``files``/``sender`` file transfers, ``tunnel`` byte streams,
``server``/``sessions`` the node server, ``keepalive`` the file streams' keepalives,
``progress``/``control``/``ratelimit`` the knobs around them.
"""

from .control import TransferControl
from .errors import (
    ChecksumMismatch,
    ConfigurationError,
    DWCPError,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    TicketError,
    TLSError,
    TransferCancelled,
    TransferError,
    TransferInterrupted,
    TransferRefused,
)
from .progress import CallbackReporter, Progress, RedisProgressReporter, Reporter, TerminalReporter
from .sender import TransferResult, send_file
from .server import ConsoleProvider, DWCPServer
from .tickets import ReplayGuard, Ticket, sign_ticket, verify_ticket
from .tls import TLSConfig, tls_from_environment
from .transport import ConnectionPool, default_pool
from .tunnel import Tunnel, TunnelResult, open_tunnel

__all__ = [
    "CallbackReporter",
    "ChecksumMismatch",
    "ConfigurationError",
    "ConnectionPool",
    "ConsoleProvider",
    "DWCPError",
    "DWCPServer",
    "LocalProtocolError",
    "Progress",
    "ProtocolError",
    "RedisProgressReporter",
    "RemoteProtocolError",
    "ReplayGuard",
    "Reporter",
    "TLSConfig",
    "TLSError",
    "TerminalReporter",
    "Ticket",
    "TicketError",
    "TransferCancelled",
    "TransferControl",
    "TransferError",
    "TransferInterrupted",
    "TransferRefused",
    "TransferResult",
    "Tunnel",
    "TunnelResult",
    "default_pool",
    "open_tunnel",
    "send_file",
    "sign_ticket",
    "tls_from_environment",
    "verify_ticket",
]
