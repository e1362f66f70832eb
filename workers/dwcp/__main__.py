"""Operator CLI: ``python -m workers.dwcp serve|send|tunnel``.

    python -m workers.dwcp serve --listen HOST:PORT --root DIR [--tunnel-root DIR] [--node-name NAME]
    python -m workers.dwcp send FILE --to HOST:PORT --name NAME [--streams N]
        [--codec auto|lz4|zstd|raw] [--bandwidth-limit-mbps N] [--base NAME]
    python -m workers.dwcp tunnel --listen-unix PATH --to HOST:PORT --target NAME [--streams N]
        [--codec auto|lz4|zstd|raw] [--bandwidth-limit-mbps N]

Both read the shared secret from ``DWCP_SECRET`` and, for mutual TLS, ``DWCP_TLS_CERT``,
``DWCP_TLS_KEY`` and ``DWCP_TLS_CA`` (all three or none; see ``workers.dwcp.tls``). ``send`` signs
its own ticket with the secret (the control plane does this for real migrations), shows a progress
bar when stderr is a terminal and prints one JSON line with the result. ``tunnel`` listens on the
unix socket PATH and joins its first client, through the server, to the unix socket NAME under the
server's ``--tunnel-root`` (a QEMU migration moved by hand: ``migrate unix:PATH`` on one host,
``-incoming unix:DIR/NAME`` on the other); it prints one JSON line once both directions ended. Its
ticket is signed at start and lives 5 minutes: the client connects within that time. Exit status:
0 done, 1 transfer failed, 2 bad usage (a bad ``DWCP_TLS_*`` set included).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from . import limits
from .control import TransferControl
from .errors import ConfigurationError, DWCPError
from .progress import TerminalReporter
from .sender import send_file
from .server import DWCPServer
from .tickets import sign_ticket
from .tls import tls_from_environment
from .transport import ConnectionPool
from .tunnel import open_tunnel

# The CLI's peers are named by host; the server checks tickets against its --node-name, which
# defaults to this host's name on both sides so an operator needs no extra flags.
DEFAULT_NODE_NAME = socket.gethostname()


def _secret() -> str:
    secret = os.environ.get("DWCP_SECRET", "")
    if not secret:
        raise ConfigurationError("DWCP_SECRET is not set: export the fleet's shared DWCP secret first")
    if len(secret.encode()) < 16:
        raise ConfigurationError("DWCP_SECRET is too short: use at least 16 bytes")
    return secret


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m workers.dwcp", description="NovaCron DWCP transfers")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run a DWCP server")
    serve.add_argument("--listen", required=True, metavar="HOST:PORT")
    serve.add_argument("--root", required=True, type=Path, metavar="DIR", help="files land under DIR only")
    serve.add_argument(
        "--tunnel-root", type=Path, default=None, metavar="DIR", help="tunnels reach sockets under DIR only"
    )
    serve.add_argument("--node-name", default=DEFAULT_NODE_NAME, help="this node's name in tickets")
    send = commands.add_parser("send", help="send one file to a DWCP server")
    send.add_argument("file", type=Path)
    send.add_argument("--to", required=True, metavar="HOST:PORT")
    send.add_argument("--name", required=True, help="target path relative to the server's root")
    send.add_argument("--streams", type=int, default=limits.DEFAULT_STREAMS)
    send.add_argument("--codec", choices=["auto", "lz4", "zstd", "raw"], default="auto")
    send.add_argument("--bandwidth-limit-mbps", type=float, default=None)
    send.add_argument("--base", default=None, help="a file under the server's root to reference")
    send.add_argument("--node-name", default=DEFAULT_NODE_NAME, help="this node's name")
    send.add_argument("--dest-node", default=DEFAULT_NODE_NAME, help="the server's --node-name")
    tunnel = commands.add_parser("tunnel", help="join a local unix socket to one on the server's node")
    tunnel.add_argument("--listen-unix", required=True, type=Path, metavar="PATH")
    tunnel.add_argument("--to", required=True, metavar="HOST:PORT")
    tunnel.add_argument("--target", required=True, help="socket path relative to the server's tunnel root")
    tunnel.add_argument("--streams", type=int, default=limits.DEFAULT_STREAMS)
    tunnel.add_argument("--codec", choices=["auto", "lz4", "zstd", "raw"], default="auto")
    tunnel.add_argument("--bandwidth-limit-mbps", type=float, default=None)
    tunnel.add_argument("--node-name", default=DEFAULT_NODE_NAME, help="this node's name")
    tunnel.add_argument("--dest-node", default=DEFAULT_NODE_NAME, help="the server's --node-name")
    return parser


def _serve(args: argparse.Namespace) -> int:
    server = DWCPServer(
        listen=args.listen,
        root=args.root,
        tunnel_root=args.tunnel_root,
        node_name=args.node_name,
        secret=_secret(),
        tls=tls_from_environment(),
    )
    server.start()
    banner = {"listening": server.address_text, "root": str(args.root), "tls": server.tls is not None}
    print(json.dumps(banner), flush=True)

    def stop(signum: int, frame: object) -> None:
        server.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.serve_forever()
    return 0


def _check_transfer_options(args: argparse.Namespace) -> None:
    if not 1 <= args.streams <= limits.MAX_STREAMS:
        raise ConfigurationError(f"--streams must be in 1..{limits.MAX_STREAMS}")
    if args.bandwidth_limit_mbps is not None and args.bandwidth_limit_mbps <= 0:
        raise ConfigurationError("--bandwidth-limit-mbps must be positive")


def _send(args: argparse.Namespace) -> int:
    secret = _secret()
    pool = ConnectionPool(tls=tls_from_environment())
    if not (args.file.is_file() or args.file.is_block_device()):
        raise ConfigurationError(f"{args.file} is neither a regular file nor a block device")
    _check_transfer_options(args)
    ticket = sign_ticket(
        secret=secret, source_node=args.node_name, dest_node=args.dest_node, kind="file", target=args.name
    )
    control = TransferControl(bandwidth_limit_mbps=args.bandwidth_limit_mbps)
    signal.signal(signal.SIGINT, lambda signum, frame: control.cancel())
    result = send_file(
        args.file,
        address=args.to,
        name=args.name,
        ticket=ticket,
        secret=secret,
        source_node=args.node_name,
        streams=args.streams,
        codec=args.codec,
        base=args.base,
        control=control,
        reporter=TerminalReporter() if sys.stderr.isatty() else None,
        pool=pool,
    )
    document = {
        "transfer_id": result.transfer_id,
        "raw_bytes": result.raw_bytes,
        "wire_bytes": result.wire_bytes,
        "seconds": round(result.seconds, 3),
        "streams": result.streams,
        "codec_mix": result.codec_mix,
        "resumed_bytes": result.resumed_bytes,
        "digest": result.digest,
    }
    print(json.dumps(document), flush=True)
    return 0


def _tunnel(args: argparse.Namespace) -> int:
    secret = _secret()
    pool = ConnectionPool(tls=tls_from_environment())
    _check_transfer_options(args)
    if not args.listen_unix.parent.is_dir():
        raise ConfigurationError(f"--listen-unix: {args.listen_unix.parent} is not a directory")
    ticket = sign_ticket(
        secret=secret, source_node=args.node_name, dest_node=args.dest_node, kind="tunnel", target=args.target
    )
    control = TransferControl(bandwidth_limit_mbps=args.bandwidth_limit_mbps)
    tunnel = open_tunnel(
        address=args.to,
        local_path=args.listen_unix,
        ticket=ticket,
        secret=secret,
        source_node=args.node_name,
        streams=args.streams,
        codec=args.codec,
        control=control,
        pool=pool,
    )
    signal.signal(signal.SIGINT, lambda signum, frame: tunnel.close())
    signal.signal(signal.SIGTERM, lambda signum, frame: tunnel.close())
    print(json.dumps({"listening": str(args.listen_unix), "transfer_id": tunnel.transfer_id}), flush=True)
    while True:  # a bounded wait, so the signal handlers above get to run
        try:
            result = tunnel.wait(timeout=0.5)
        except TimeoutError:
            continue
        print(json.dumps(result.as_dict()), flush=True)
        return 0


COMMANDS = {"serve": _serve, "send": _send, "tunnel": _tunnel}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigurationError as exc:
        print(f"dwcp: {exc}", file=sys.stderr)
        return 2
    except DWCPError as exc:
        print(f"dwcp: transfer failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
