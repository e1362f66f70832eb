"""Optional mutual TLS under DWCP: settings from the environment, contexts, and the TLS record layer.

Enabled by three variables, all or none (none = plain TCP, as before)::

    DWCP_TLS_CERT   this node's certificate (PEM), signed by the fleet CA; may hold the chain
    DWCP_TLS_KEY    its private key (PEM, unencrypted)
    DWCP_TLS_CA     the fleet CA (PEM): the only issuer trusted for peers, both directions

Rules: TLS 1.3 only; both sides present a certificate and verify the other's (``CERT_REQUIRED``
both ways). TLS adds transport authentication and encryption; it replaces nothing: the DWCP
handshake (mutual proof of the shared secret) and the HMAC ticket of every transfer are checked
inside TLS exactly as without it.

Identity is the **node name**, the name tickets use, not the address dialled. A node's certificate
carries its node name as a DNS subjectAltName (``DNS:node-2``; the CN is consulted only when the
certificate has no DNS SAN). The client verifies the server's certificate against the ticket's
destination node (``server_hostname=dest_node``, OpenSSL's host check), and the server requires
the client's certificate to name the ticket's source node. Addresses are not identities here:
nodes are registered by name, their addresses come from configuration (``NODE_ADDRESS``, a
wildcard's FQDN, 127.0.0.1 for every node of a dev setup) and may be reused; an IP SAN check would
accept any node that happens to answer on the dialled address, the node-name check accepts only
the node the control plane signed the transfer for.

Threads: a DWCP connection is read by one thread while another writes (tunnels both ways, file
watchers beside writers). OpenSSL forbids concurrent ``SSL_read``/``SSL_write`` on one ``SSL``
object (openssl/openssl#20446), so ``ssl.SSLSocket`` is not used. ``TLSSession`` keeps the socket
I/O to the caller and runs OpenSSL on memory BIOs (``ssl.SSLObject``) under a lock held only while
encrypting or decrypting: the reader blocks in ``recv`` and the writer in ``send`` without holding
it, and records reach the wire in the order they were sealed because one writer at a time
(``Channel``'s send lock) seals and sends. Only writers drain the outgoing BIO.

TLS session tickets are off (``num_tickets = 0``): connections are pooled instead of resumed, and
an unread post-handshake ticket would make an idle pooled connection look readable (not reusable).
"""

from __future__ import annotations

import enum
import os
import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

from .errors import ConfigurationError, TLSError

ENV_CERT: Final = "DWCP_TLS_CERT"
ENV_KEY: Final = "DWCP_TLS_KEY"
ENV_CA: Final = "DWCP_TLS_CA"
ENV_VARIABLES: Final = (ENV_CERT, ENV_KEY, ENV_CA)

# Ciphertext read from the socket per recv: several full TLS records (16 KiB + 22 bytes each), so a
# 1 MiB payload costs a few dozen system calls, as in plain mode with its large socket buffers.
RECV_CHUNK_SIZE: Final = 256 * 1024
# TLS record type bytes a peer speaking TLS sends first (handshake) or when refusing (alert); a
# plain DWCP hello starts with b"DWCP".
TLS_RECORD_TYPES: Final = (0x15, 0x16)
# What a TLS server answers a plain DWCP hello with: a fatal handshake_failure alert (type 0x15,
# version 3.3, length 2, level fatal, description 40), which the plain client recognises as TLS.
HANDSHAKE_FAILURE_ALERT: Final = bytes([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 40])


class _Environment(enum.Enum):
    FROM_ENVIRONMENT = "from the environment"


FROM_ENVIRONMENT: Final = _Environment.FROM_ENVIRONMENT


@dataclass(frozen=True)
class TLSConfig:
    """Both TLS contexts of a node: as a server (accepting) and as a client (dialling peers)."""

    server_context: ssl.SSLContext = field(repr=False)
    client_context: ssl.SSLContext = field(repr=False)
    description: str = ""

    @classmethod
    def load(
        cls, *, cert: str | os.PathLike[str], key: str | os.PathLike[str], ca: str | os.PathLike[str]
    ) -> TLSConfig:
        """Build both contexts; any unreadable or mismatched file is a ``ConfigurationError``."""
        paths = {ENV_CERT: Path(cert), ENV_KEY: Path(key), ENV_CA: Path(ca)}
        for variable, path in paths.items():
            if not path.is_file() or not os.access(path, os.R_OK):
                raise ConfigurationError(f"{variable}={path} is not a readable file")
        contexts = []
        for purpose in (ssl.PROTOCOL_TLS_SERVER, ssl.PROTOCOL_TLS_CLIENT):
            context = ssl.SSLContext(purpose)
            context.minimum_version = ssl.TLSVersion.TLSv1_3
            context.verify_mode = ssl.CERT_REQUIRED
            try:
                context.load_cert_chain(paths[ENV_CERT], paths[ENV_KEY])
            except (ssl.SSLError, OSError) as exc:
                raise ConfigurationError(
                    f"{ENV_CERT}={paths[ENV_CERT]} / {ENV_KEY}={paths[ENV_KEY]}: not a PEM certificate "
                    f"and its private key: {exc}"
                ) from exc
            try:
                context.load_verify_locations(cafile=paths[ENV_CA])
            except (ssl.SSLError, OSError) as exc:
                raise ConfigurationError(
                    f"{ENV_CA}={paths[ENV_CA]}: not a PEM CA certificate: {exc}"
                ) from exc
            contexts.append(context)
        server, client = contexts
        server.num_tickets = 0
        client.check_hostname = True  # against the destination node name (see the module docstring)
        return cls(server, client, description=f"cert {paths[ENV_CERT]}, CA {paths[ENV_CA]}")


# What servers and pools take: a config, None for plain TCP, or FROM_ENVIRONMENT (the default: the
# node worker and the CLI build servers and the default pool without knowing about TLS).
TLSSetting = TLSConfig | None | Literal[_Environment.FROM_ENVIRONMENT]


def tls_from_environment(environ: Mapping[str, str] | None = None) -> TLSConfig | None:
    """``TLSConfig`` from ``DWCP_TLS_*``; None when none is set; a partial set is an error naming
    what is missing."""
    environ = os.environ if environ is None else environ
    values = {name: environ.get(name, "") for name in ENV_VARIABLES}
    missing = [name for name, value in values.items() if not value]
    if len(missing) == len(ENV_VARIABLES):
        return None
    if missing:
        given = ", ".join(name for name in ENV_VARIABLES if name not in missing)
        raise ConfigurationError(
            f"DWCP TLS is half configured: {given} set but {', '.join(missing)} missing "
            f"(set all of {', '.join(ENV_VARIABLES)}, or none for plain TCP)"
        )
    return TLSConfig.load(cert=values[ENV_CERT], key=values[ENV_KEY], ca=values[ENV_CA])


def resolve(setting: TLSSetting) -> TLSConfig | None:
    return tls_from_environment() if setting is FROM_ENVIRONMENT else setting


def certificate_names(certificate: Mapping[str, object] | None) -> set[str]:
    """DNS subjectAltNames of a verified peer certificate (``getpeercert()``), else its CN."""
    if not certificate:
        return set()
    alt_names = certificate.get("subjectAltName", ())
    names = {str(value).lower() for kind, value in alt_names if kind == "DNS"}  # type: ignore[attr-defined]
    if names:
        return names
    for rdn in certificate.get("subject", ()):  # type: ignore[attr-defined]
        for key, value in rdn:
            if key == "commonName":
                names.add(str(value).lower())
    return names


def describe_ssl_error(exc: ssl.SSLError) -> str:
    """What went wrong, in words an operator can act on."""
    reason = (exc.reason or str(exc)).lower().replace("_", " ")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"peer certificate refused: {exc.verify_message or reason} (it must be signed by DWCP_TLS_CA "
            "and name the node expected)"
        )
    if "certificate required" in reason:
        return "the peer requires a client certificate and none was sent (set DWCP_TLS_CERT/KEY/CA)"
    if "unknown ca" in reason or "bad certificate" in reason or "certificate unknown" in reason:
        return (
            f"the peer refused this node's certificate ({reason}): not signed by the CA it trusts, or "
            "(bad certificate) the peer's own certificate did not name the node expected here"
        )
    if "wrong version number" in reason or "record layer failure" in reason or "packet length" in reason:
        return f"the peer does not speak TLS ({reason}): it runs without DWCP_TLS_* settings"
    if isinstance(exc, ssl.SSLEOFError) or "eof" in reason:
        return (
            "the peer closed the connection during the TLS handshake (does it run without TLS, or refuse us?)"
        )
    return reason


class TLSSession:
    """TLS over a blocking socket with the socket I/O left to the caller (see the module docstring).

    ``seal`` (writers, one at a time) returns ciphertext to send; ``feed`` hands received ciphertext
    over and ``read_into`` takes plaintext out (the reader). The lock only covers OpenSSL calls.
    """

    def __init__(
        self, context: ssl.SSLContext, *, server_side: bool, server_hostname: str | None = None
    ) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._object = context.wrap_bio(
            self._incoming, self._outgoing, server_side=server_side, server_hostname=server_hostname
        )
        self._lock = threading.Lock()
        self.peer_names: set[str] = set()

    # -- handshake (one thread) ------------------------------------------------------------------

    def handshake_step(self) -> tuple[bool, bytes]:
        """One try at the handshake: (done, bytes to send to the peer). Raises ``ssl.SSLError``
        on failure, after which ``pending_output()`` still holds the alert for the peer."""
        with self._lock:
            try:
                self._object.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            output = self._outgoing.read()
        if done:
            self.peer_names = certificate_names(self._object.getpeercert())
            if self._object.version() != "TLSv1.3":  # the contexts allow nothing else; belt and braces
                raise TLSError(f"negotiated {self._object.version()}, DWCP requires TLSv1.3")
        return done, output

    def version(self) -> str | None:
        """The negotiated protocol (``"TLSv1.3"``), None before the handshake."""
        return self._object.version()

    def pending_output(self) -> bytes:
        with self._lock:
            return self._outgoing.read()

    # -- data ------------------------------------------------------------------------------------

    def seal(self, buffers: tuple[bytes | bytearray | memoryview, ...]) -> bytes:
        """Encrypt ``buffers`` (in order) into TLS records; returns the ciphertext to send."""
        with self._lock:
            for buffer in buffers:
                view = memoryview(buffer).cast("B")
                while len(view):  # a memory BIO takes everything; loop in case OpenSSL says otherwise
                    view = view[self._object.write(view) :]
            return self._outgoing.read()

    def feed(self, ciphertext: bytes) -> None:
        """Ciphertext from the socket; ``b""`` means the peer closed the TCP connection."""
        with self._lock:
            if ciphertext:
                self._incoming.write(ciphertext)
            else:
                self._incoming.write_eof()

    def read_into(self, view: memoryview) -> int | None:
        """Plaintext into ``view``: bytes read, 0 at EOF, None when more ciphertext is needed.
        Takes as many records as are buffered (``SSL_read`` hands out one at a time)."""
        filled = 0
        with self._lock:
            while filled < len(view):
                try:
                    got = self._object.read(len(view) - filled, view[filled:])
                except ssl.SSLWantReadError:
                    return filled or None
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    return filled  # close_notify, or TCP EOF: DWCP's own framing tells clean from cut
                assert isinstance(got, int)  # with a buffer, read() returns the count
                if not got:
                    break
                filled += got
        return filled

    def buffered(self) -> bool:
        """Received bytes not yet handed out (decrypted or still sealed)."""
        with self._lock:
            return bool(self._object.pending() or self._incoming.pending)
