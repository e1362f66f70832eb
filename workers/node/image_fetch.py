"""The node's image tasks: push a cached image to a peer, adopt a received one, list the cache.

Both ends report every step to the control plane (``contract.CONTROL_IMAGE_FETCH_REPORT``), which
alone decides what happens next (adopt, retry from another source, fail the waiting VMs). The push
is a DWCP file transfer into the receiver's IMAGE_INCOMING_DIR; a retried push of the same image
resumes from what the receiver's journal holds. After an adoption the cache evicts what no VM uses
beyond its limit and the node reports its whole listing.
"""

from typing import Any, Unpack

from celery import Celery

from workers import contract
from workers.dwcp import DWCPError
from workers.image_push import push_image

from .config import NodeConfig
from .images import ImageCache, ImageRefused
from .reports import Reporter

TASK_OPTIONS: dict[str, Any] = {"acks_late": True, "reject_on_worker_lost": True, "time_limit": 6 * 3600}


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
            detail = push_image(
                path,
                request,
                secret=self.config.dwcp_secret,
                source_node=self.config.name,
                step=progress,
                link_outage_seconds=self.config.link_outage_seconds,
            )
        except (DWCPError, OSError) as exc:
            self.reporter.image_fetch(fetch_id=fetch_id, sha256=sha256, event="failed", detail=str(exc))
            return
        self.reporter.image_fetch(fetch_id=fetch_id, sha256=sha256, event="sent", detail=detail)

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
