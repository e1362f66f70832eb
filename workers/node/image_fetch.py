"""The node's image tasks: push a cached image to a peer, adopt a received one, list the cache.

Both ends report every step to the control plane (``contract.CONTROL_IMAGE_FETCH_REPORT``), which
alone decides what happens next (adopt, retry from another source, fail the waiting VMs). The push
is a DWCP file transfer into the receiver's IMAGE_INCOMING_DIR; a retried push of the same image
resumes from what the receiver's journal holds. After an adoption the cache evicts what no VM uses
beyond its limit and the node reports its whole listing.
"""

import logging
from typing import Any, Unpack

from celery import Celery

from workers import contract
from workers.dwcp import DWCPError, Progress, send_file

from .config import NodeConfig
from .images import ImageCache, ImageRefused
from .reports import Reporter

logger = logging.getLogger(__name__)

TASK_OPTIONS: dict[str, Any] = {"acks_late": True, "reject_on_worker_lost": True, "time_limit": 6 * 3600}


class StepReporter:
    """A DWCP progress reporter that calls ``report(percent)`` at every IMAGE_PROGRESS_STEP percent."""

    def __init__(self, total: int, report: Any) -> None:
        self.total = max(total, 1)
        self.report_step = report
        self.next_step = contract.IMAGE_PROGRESS_STEP

    def report(self, progress: Progress) -> None:
        percent = min(100.0 * progress.raw_bytes / self.total, 100.0)
        if percent >= self.next_step and percent < 100:
            self.next_step = (int(percent) // contract.IMAGE_PROGRESS_STEP + 1) * contract.IMAGE_PROGRESS_STEP
            self.report_step(percent)


class ImageTasks:
    def __init__(self, config: NodeConfig, cache: ImageCache, reporter: Reporter) -> None:
        self.config = config
        self.cache = cache
        self.reporter = reporter

    def send(self, **request: Unpack[contract.ImageSend]) -> None:
        fetch_id, sha256 = request["fetch_id"], request["sha256"]
        path = self.cache.path(sha256)
        if not path.is_file():
            self.reporter.image_fetch(
                fetch_id=fetch_id,
                sha256=sha256,
                event="failed",
                detail=f"{self.config.name} does not hold it",
            )
            self.report_listing()
            return
        self.cache.touch(sha256)

        def progress(percent: float) -> None:
            self.reporter.image_fetch(fetch_id=fetch_id, sha256=sha256, event="progress", percent=percent)

        try:
            result = send_file(
                path,
                address=request["dest_dwcp_address"],
                name=request["target"],
                ticket=request["ticket"],
                secret=self.config.dwcp_secret,
                source_node=self.config.name,
                streams=request["streams"],
                reporter=StepReporter(path.stat().st_size, progress),
            )
        except (DWCPError, OSError) as exc:
            self.reporter.image_fetch(fetch_id=fetch_id, sha256=sha256, event="failed", detail=str(exc))
            return
        self.reporter.image_fetch(
            fetch_id=fetch_id,
            sha256=sha256,
            event="sent",
            detail=f"{result.raw_bytes} bytes ({result.wire_bytes} on the wire, {result.resumed_bytes} "
            f"resumed) in {result.seconds:.1f} s",
        )

    def adopt(self, **request: Unpack[contract.ImageAdopt]) -> None:
        fetch_id, sha256 = request["fetch_id"], request["sha256"]
        try:
            self.cache.adopt(sha256, request["size_bytes"])
        except (ImageRefused, OSError) as exc:
            self.reporter.image_fetch(fetch_id=fetch_id, sha256=sha256, event="failed", detail=str(exc))
            return
        self.reporter.image_fetch(fetch_id=fetch_id, sha256=sha256, event="adopted")
        self.report_listing(evict=True)

    def report_listing(self, *, evict: bool = False) -> None:
        over = self.cache.evict()[1] if evict else ""
        self.reporter.images(self.cache.listing(), over_limit=over)


def register_image_tasks(app: Celery, tasks: ImageTasks) -> None:
    """Bind the image tasks of ``workers.contract`` to this node's cache."""
    app.task(name=contract.NODE_IMAGE_SEND, **TASK_OPTIONS)(tasks.send)
    app.task(name=contract.NODE_IMAGE_ADOPT, **TASK_OPTIONS)(tasks.adopt)
