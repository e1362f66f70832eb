"""What a VM's cloud-init seed may carry, checked at the API: hostname, SSH public keys, user data.

The node builds the NoCloud seed from these (``workers.contract.SeedDescription``); what passes here
is what cloud-init accepts. User data is the user's own text: it is stored, sent to the VM's node and
never shown back or logged (the VM's answer and the audit trail carry neither its text nor its size).
"""

import base64
import binascii
import re
import struct
from typing import Final

import yaml

MAX_SSH_KEYS: Final = 16
MAX_SSH_KEY_CHARS: Final = 8192
MAX_USER_DATA_BYTES: Final = 65536  # as OpenStack Nova's limit on user data
SSH_KEY_TYPES: Final = frozenset(
    {
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    }
)
# The headers cloud-init recognises as the start of a part of user data.
USER_DATA_HEADERS: Final = ("#cloud-config", "#!", "#include", "#cloud-boothook", "Content-Type:")
_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_KEY_LENGTH = struct.Struct("!I")


class CloudInitError(ValueError):
    """The value is not one cloud-init takes; the message says why."""


def check_hostname(value: str) -> str:
    """An RFC 1123 host name (labels of letters, digits and inner dashes; 253 characters at most)."""
    if len(value) > 253 or not all(_LABEL.fullmatch(label) for label in value.split(".")):
        raise CloudInitError(
            "Use an RFC 1123 host name: dot-separated labels of 1-63 letters, digits or inner dashes, "
            "253 characters at most."
        )
    return value


def hostname_for(name: str) -> str:
    """The host name a VM gets when none was asked for: its name, made a valid label."""
    label = re.sub(r"[^A-Za-z0-9-]+", "-", name).strip("-")[:63].strip("-")
    return label or "vm"


def check_ssh_key(value: str) -> str:
    """One OpenSSH public key line: ``TYPE BASE64 [COMMENT]`` whose blob names the same type."""
    if len(value) > MAX_SSH_KEY_CHARS or "\n" in value or "\r" in value or "\0" in value:
        raise CloudInitError(f"An SSH key is one line of at most {MAX_SSH_KEY_CHARS} characters.")
    parts = value.strip().split(maxsplit=2)
    if len(parts) < 2 or parts[0] not in SSH_KEY_TYPES:
        raise CloudInitError(
            f"Not an OpenSSH public key: expected 'TYPE BASE64 [COMMENT]' with TYPE one of "
            f"{', '.join(sorted(SSH_KEY_TYPES))}."
        )
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        raise CloudInitError("The key's data is not valid base64.") from None
    if len(blob) < _KEY_LENGTH.size:
        raise CloudInitError("The key's data is too short to be a public key.")
    (length,) = _KEY_LENGTH.unpack_from(blob)
    if blob[_KEY_LENGTH.size : _KEY_LENGTH.size + length] != parts[0].encode():
        raise CloudInitError(f"The key's data is not a {parts[0]} key.")
    return value.strip()


def check_user_data(value: str) -> str:
    """User data cloud-init runs: a known header; cloud-config must be a YAML mapping."""
    if len(value.encode()) > MAX_USER_DATA_BYTES:
        raise CloudInitError(f"User data holds at most {MAX_USER_DATA_BYTES} bytes.")
    if "\0" in value:
        raise CloudInitError("User data is text; it cannot hold NUL characters.")
    if not value.startswith(USER_DATA_HEADERS):
        raise CloudInitError(
            f"User data must start with one of {', '.join(USER_DATA_HEADERS)}: "
            "cloud-init ignores anything else."
        )
    if value.startswith("#cloud-config"):
        try:
            document = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise CloudInitError(f"The cloud-config is not valid YAML{where}.") from None
        if document is not None and not isinstance(document, dict):
            raise CloudInitError("A cloud-config is a YAML mapping of modules to their settings.")
    return value
