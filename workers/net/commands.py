"""The kernel's own tools, run as subprocesses: ``ip``, ``bridge`` (JSON output) and ``nft``.

A failing command raises :class:`~workers.net.model.NetworkError` with the command and its stderr, so
the reason reaches the VM's error state unchanged. Commands run in the caller's network namespace.
"""

import json
import subprocess
from typing import Any

from .model import NetworkError

TIMEOUT = 30.0  # seconds: these return in milliseconds; a hang means a wedged kernel or tool


def run(*command: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(
            command, input=stdin, capture_output=True, text=True, timeout=TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetworkError(f"{' '.join(command)}: {exc}") from None
    if check and result.returncode != 0:
        raise NetworkError(f"{' '.join(command)}: {result.stderr.strip() or f'exit {result.returncode}'}")
    return result


def json_of(*command: str) -> list[dict[str, Any]]:
    """The JSON list an ``ip -j`` / ``bridge -j`` command prints (empty output: an empty list)."""
    output = run(*command).stdout.strip()
    if not output:
        return []
    value = json.loads(output)
    return value if isinstance(value, list) else []


def nft(script: str) -> None:
    """Apply ``script`` as one nftables transaction: all of it, or nothing."""
    run("nft", "-f", "-", stdin=script)
