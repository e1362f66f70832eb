"""Control-queue tasks of the image store (routed to ``control`` by ``CELERY_TASK_ROUTES``)."""

from celery import shared_task

from .downloads import import_url

IMPORT_TIME_LIMIT = 6 * 3600  # a 64 GiB image over a slow link; a try stalls out after 30 s anyway


@shared_task(name="apps.images.tasks.image_import_url", acks_late=True, time_limit=IMPORT_TIME_LIMIT)
def image_import_url(image_id: int) -> None:
    """Fetch image ``image_id``'s file from its URL into the store (idempotent: see ``import_url``)."""
    import_url(image_id)
