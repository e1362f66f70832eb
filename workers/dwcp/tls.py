"""Optional TLS between nodes, with mutual authentication by certificates of the fleet's CA.

DWCP's own handshake already proves both ends know the shared secret, and every chunk carries a
checksum; TLS adds confidentiality and integrity against someone on the path. Both sides present
a certificate signed by the fleet CA (``ca_file``) and refuse a peer that does not. Peers are
addressed by IP, so host names are not checked: the CA signature is the identity. TLS 1.3 only;
the server issues no session tickets, so an idle pooled connection never has unread bytes (which
is how ``Channel.reusable`` tells it is still healthy).
"""

from __future__ import annotations

import functools
import ssl
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TLSConfig:
    cert_file: str  # this node's certificate (PEM), signed by the fleet CA
    key_file: str  # its private key (PEM)
    ca_file: str  # the fleet CA certificate(s) (PEM) that peers' certificates must chain to


@functools.lru_cache(maxsize=8)
def _context(config: TLSConfig, server_side: bool) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(config.cert_file, config.key_file)
    context.load_verify_locations(config.ca_file)
    context.verify_mode = ssl.CERT_REQUIRED
    if server_side:
        context.num_tickets = 0
    else:
        context.check_hostname = False
    return context


def client_context(config: TLSConfig) -> ssl.SSLContext:
    return _context(config, False)


def server_context(config: TLSConfig) -> ssl.SSLContext:
    return _context(config, True)
