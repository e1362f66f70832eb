"""Pushing one stored image to a node by DWCP, as a node's cache or the control host's store sends it.

Shared by both senders (the control plane imports it as it imports ``workers.dwcp``: no node code, no
Django). Progress is reported every ``contract.IMAGE_PROGRESS_STEP`` percent (and every
``IMAGE_PROGRESS_INTERVAL`` seconds), never 100 (the end is
"sent", once the receiver verified DWCP's digest and renamed the file into its incoming directory).
"""

import time
from collections.abc import Callable
from pathlib import Path

from workers import contract
from workers.dwcp import Progress, limits, send_file


class StepReporter:
    """A DWCP progress reporter that calls ``step(percent)`` at every IMAGE_PROGRESS_STEP percent, and
    after IMAGE_PROGRESS_INTERVAL seconds without one (the fetch is alive, however slow)."""

    def __init__(self, total: int, step: Callable[[float], None]) -> None:
        self.total = max(total, 1)
        self.step = step
        self.next_step = float(contract.IMAGE_PROGRESS_STEP)
        self.last = time.monotonic()

    def report(self, progress: Progress) -> None:
        percent = min(100.0 * progress.raw_bytes / self.total, 100.0)
        due = time.monotonic() - self.last >= contract.IMAGE_PROGRESS_INTERVAL
        if percent < 100 and (percent >= self.next_step or due):
            steps = int(percent) // contract.IMAGE_PROGRESS_STEP + 1
            self.next_step = float(steps * contract.IMAGE_PROGRESS_STEP)
            self.last = time.monotonic()
            self.step(percent)


def push_image(
    path: Path,
    request: contract.ImageSend,
    *,
    secret: str,
    source_node: str,
    step: Callable[[float], None],
    link_outage_seconds: float = limits.TUNNEL_LINK_OUTAGE_SECONDS,
) -> str:
    """Send ``path`` as ``request`` asks; the figures of the transfer as text. Raises DWCP's errors.

    A cut link is resumed within ``link_outage_seconds`` in this same push (the reporter keeps
    reporting meanwhile, so the control plane does not try another source)."""
    result = send_file(
        path,
        address=request["dest_dwcp_address"],
        name=request["target"],
        ticket=request["ticket"],
        secret=secret,
        source_node=source_node,
        streams=request["streams"],
        reporter=StepReporter(path.stat().st_size, step),
        link_outage_seconds=link_outage_seconds,
    )
    outages = f", {len(result.outages)} link outages survived" if result.outages else ""
    return (
        f"{result.raw_bytes} bytes ({result.wire_bytes} on the wire, {result.resumed_bytes} resumed"
        f"{outages}) in {result.seconds:.1f} s"
    )
