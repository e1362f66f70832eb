"""Control-queue tasks of image distribution: the store's pushes and the nodes' image reports.

Tasks take the contract's payloads and call one service of ``apps.images.fetches``; every one is
idempotent (a report of a fetch that is no longer under way changes nothing).
"""

from typing import Unpack

from celery import shared_task

from workers import contract

from . import fetches


@shared_task(name="apps.images.fetch_tasks.store_send", acks_late=True, time_limit=3600)
def store_send(**request: Unpack[contract.ImageSend]) -> None:
    """Push an image from the control host's store to the node a fetch names."""
    fetches.store_push(**request)


@shared_task(name=contract.CONTROL_IMAGE_FETCH_REPORT, acks_late=True, time_limit=60)
def image_fetch_report(**report: Unpack[contract.ImageFetchReport]) -> None:
    """A step of a fetch, from its sender or its receiver, or a node's missing image."""
    fetches.fetch_report(**report)


@shared_task(name=contract.CONTROL_NODE_IMAGES, acks_late=True, time_limit=60)
def node_images(**listing: Unpack[contract.NodeImages]) -> None:
    """Everything a node's image cache holds (at its start and after each adoption or eviction)."""
    fetches.node_images(**listing)


@shared_task(name="apps.images.fetch_tasks.fetches_watchdog", acks_late=True, time_limit=60, expires=10)
def fetches_watchdog() -> list[str]:
    """Beat task: restart stalled fetches from their next source."""
    return fetches.fetches_watchdog()
