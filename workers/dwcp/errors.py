"""Exceptions raised by DWCP.

The split follows h11: a ``LocalProtocolError`` means *we* were about to break the protocol (a bug
or a misuse of the API on this side), a ``RemoteProtocolError`` means the peer sent something we
refuse. Both derive from ``ProtocolError`` so callers that only want "the conversation broke" catch
one class. Transfer-level failures that are not protocol violations (a refused ticket, a digest
mismatch, a cut connection) are ``TransferError`` subclasses carrying a machine-readable ``code``.
"""

from __future__ import annotations


class DWCPError(Exception):
    """Root of every DWCP exception."""


class ProtocolError(DWCPError):
    """The byte conversation is broken; the connection must be dropped."""


class LocalProtocolError(ProtocolError):
    """This side tried to do something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes or frames the protocol does not allow."""


class ConnectionLost(RemoteProtocolError):
    """The byte stream ended in the middle of a frame or a transfer: a cut, not a malformed peer."""


class TLSMismatch(RemoteProtocolError):
    """One side speaks TLS and the other plain DWCP (``DWCP_TLS_*`` set on one node only)."""


class ChecksumMismatch(RemoteProtocolError):
    """A frame's payload did not decode to bytes matching its xxh3-64 checksum."""


class TicketError(DWCPError):
    """A transfer ticket was refused; ``reason`` says why (forged, expired, replayed, ...)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


class TransferError(DWCPError):
    """A transfer did not complete. ``code`` is stable and machine-readable."""

    code = "transfer_failed"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class TransferRefused(TransferError):
    """The receiver refused to start the transfer (bad ticket, bad target, busy)."""

    code = "refused"


class TransferInterrupted(TransferError):
    """The connection was cut mid-transfer; a new ``send_file`` call resumes where it stopped."""

    code = "interrupted"


class TransferCancelled(TransferError):
    """The transfer was cancelled through its handle."""

    code = "cancelled"


class TLSError(TransferError):
    """TLS with the peer failed: a certificate refused, a peer name mismatch, one side without TLS.
    Not transient: retrying cannot help until the certificates or DWCP_TLS_* settings are fixed."""

    code = "tls"


class ConfigurationError(DWCPError):
    """DWCP was started without something it needs (the shared secret, a root directory)."""
