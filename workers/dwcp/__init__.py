"""DWCP, NovaCron's node-to-node transfer protocol: disk images and tunnelled byte streams.

Public API (everything else in this package is internal)::

    # control plane: mint a ticket for one transfer (pure Python, no Django)
    sign_ticket(*, secret, source_node, dest_node, kind: "file" | "tunnel", target,
                transfer_id=None, ttl_seconds=300) -> str
    verify_ticket(token, *, secret, node_name, replay_guard=None) -> Ticket   # raises TicketError

    # node worker: run the server (returns at once; stop() to shut down; also a context manager)
    server = DWCPServer(listen="0.0.0.0:7400", root="/var/lib/novacron", node_name="node-2",
                        secret=secret, tunnel_root=None)
    server.start(); ...; server.stop()

    # node worker (source side): send a file; blocks; raises TransferError subclasses
    send_file(path, *, address="node-2:7400", name="vms/42/disk.qcow2", ticket=token,
              secret=secret, source_node="node-1", streams=4, codec="auto",
              base=None, control=None, reporter=None) -> TransferResult

    # migrations: a local unix socket joined to a unix socket on the peer node
    tunnel = open_tunnel(address="node-2:7400", local_path="/run/novacron/vm42-mig.sock",
                         ticket=token, secret=secret, source_node="node-1", streams=4)
    # point QEMU at unix:/run/novacron/vm42-mig.sock; then
    tunnel.wait() -> TunnelResult      # or tunnel.close() to cancel

    # live control of a running transfer, from any thread
    control = TransferControl(bandwidth_limit_mbps=None)
    control.set_bandwidth_limit(200); control.cancel()

    # progress (at most 5 updates/s): RedisProgressReporter(redis_client, key_prefix=...)
    # writes hash <prefix><transfer_id> and publishes on <prefix><transfer_id>:events

Errors: ``TicketError`` (refused ticket), ``TransferRefused``, ``TransferInterrupted`` (call
``send_file`` again with a new ticket: the receiver reports what it holds and only the rest is
sent), ``TransferCancelled``, ``TransferError`` (base, with ``code``); protocol violations are
``LocalProtocolError`` / ``RemoteProtocolError`` (both ``ProtocolError``).

Layout: ``frames``/``protocol`` are the sans-I/O core (wire format, handshake, state machine),
``limits`` holds every bound, ``codecs`` the per-chunk codecs and adaptive policy, ``transport``
the socket adapters and pool, ``files``/``sender`` file transfers, ``tunnel`` byte streams,
``server``/``sessions`` the node server, ``progress``/``control``/``ratelimit`` the knobs around them.
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
    TransferCancelled,
    TransferError,
    TransferInterrupted,
    TransferRefused,
)
from .progress import CallbackReporter, Progress, RedisProgressReporter, Reporter, TerminalReporter
from .sender import TransferResult, send_file
from .server import DWCPServer
from .tickets import ReplayGuard, Ticket, sign_ticket, verify_ticket
from .transport import ConnectionPool, default_pool
from .tunnel import Tunnel, TunnelResult, open_tunnel

__all__ = [
    "CallbackReporter",
    "ChecksumMismatch",
    "ConfigurationError",
    "ConnectionPool",
    "DWCPError",
    "DWCPServer",
    "LocalProtocolError",
    "Progress",
    "ProtocolError",
    "RedisProgressReporter",
    "RemoteProtocolError",
    "ReplayGuard",
    "Reporter",
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
    "verify_ticket",
]
