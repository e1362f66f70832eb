"""Import of an image from an http(s) URL, by the control worker (:mod:`apps.images.tasks`).

The file is streamed to the image's partial file in the store like an upload, and verified the same
way. A cut transfer is resumed with a ``Range`` request when the server answers ``206`` from the held
offset (else it starts again from byte 0), after a pause that doubles per try; after
``IMAGE_URL_ATTEMPTS`` tries, or at once on an HTTP error, the image is ``failed`` with the reason.
Only http and https are fetched, redirects included; the size limit holds whatever the server says.
"""

import http.client
import logging
import time
import urllib.error
import urllib.request
from typing import IO, Any, Final
from urllib.parse import urlsplit

from apps.audit.choices import AuditAction
from apps.audit.services import audit_record
from apps.core.conf import novacron_setting
from apps.core.errors import Conflict, InvalidInput, NovaCronError
from apps.vms.choices import ImageStatus
from apps.vms.models import Image

from . import imports
from .probe import ImageRefused
from .store import held_bytes

logger = logging.getLogger(__name__)

SCHEMES: Final = frozenset({"http", "https"})
TIMEOUT: Final = 30.0  # seconds without a byte before a try is abandoned
FIRST_PAUSE: Final = 1.0


class TransferError(Exception):
    """A try that can be repeated (the connection, the server's 5xx)."""


def check_url(url: str) -> str:
    """``url`` if it is an http(s) URL with a host; :class:`InvalidInput` otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES or not parts.hostname:
        message = f"Only http:// and https:// URLs are imported, not {url[:100]!r}."
        raise InvalidInput(message, fields={"source_url": [message]})
    return url


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects to http(s) only (urllib's own also follows ftp)."""

    def redirect_request(  # noqa: PLR0917 - urllib's signature
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        if urlsplit(newurl).scheme not in SCHEMES:
            raise urllib.error.HTTPError(
                newurl, code, f"redirect to a non-http(s) URL {newurl[:100]!r}", headers, fp
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER: Final = urllib.request.build_opener(_HttpOnlyRedirects)


def import_url(image_id: int) -> None:
    """Fetch and store the file of image ``image_id`` from its ``source_url`` (a redelivered task
    whose first run still holds the image's lock, or an image no longer importing, does nothing)."""
    try:
        with imports.import_lock(image_id):
            image = Image.objects.filter(pk=image_id, status=ImageStatus.IMPORTING).first()
            if image is not None:
                _import(image)
    except Conflict:
        logger.info("image %s: its import already runs elsewhere", image_id)


def _import(image: Image) -> None:
    attempts = max(1, int(novacron_setting("IMAGE_URL_ATTEMPTS")))
    pause = FIRST_PAUSE
    for attempt in range(1, attempts + 1):
        try:
            _fetch(image)
            break
        except TransferError as exc:
            if attempt == attempts:
                _failed(image, f"The download failed after {attempts} tries: {exc}")
                return
            logger.warning(
                "image %s: try %d of %d failed (%s); again in %.0f s", image.pk, attempt, attempts, exc, pause
            )
            time.sleep(pause)
            pause *= 2
        except NovaCronError as exc:
            _failed(image, exc.message)
            return
    try:
        stored = imports.finish(image)
    except ImageRefused as refused:
        _record(stored_image=image, status=400, error=refused.code)
        logger.info("image %s refused: %s", image.pk, refused.message)
        return
    _record(stored_image=stored, status=200)


def _fetch(image: Image) -> None:
    """One try: append the rest of the file from the held offset (or all of it again)."""
    held = held_bytes(image.pk)
    url = check_url(image.source_url)
    request = urllib.request.Request(url, headers={"Range": f"bytes={held}-"} if held else {})  # noqa: S310 - http(s) only
    try:
        response: Any = _OPENER.open(request, timeout=TIMEOUT)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and held:  # the server has no byte past what is held: the file is complete
            return
        if exc.code >= 500:
            raise TransferError(f"HTTP {exc.code} from {image.source_url}") from exc
        raise InvalidInput(f"HTTP {exc.code} {exc.reason} from {image.source_url}.") from exc
    except (OSError, ValueError) as exc:
        raise TransferError(str(exc)) from exc
    with response:
        start = held if response.status == 206 and _range_start(response) == held else 0
        length = int(response.headers.get("Content-Length") or 0)
        total = start + length if length else 0
        if total:
            imports.check_size(total)
        cap = (total or imports.max_bytes() + 1) - start
        Image.objects.filter(pk=image.pk).update(size_bytes=total)
        written = imports.append(image.pk, _Body(response), cap, start=start)
    if not total and start + written > imports.max_bytes():
        imports.check_size(start + written)
    if total and start + written < total:
        raise TransferError(f"the connection ended after {start + written} of {total} bytes")


class _Body:
    """A response's body whose cut (``IncompleteRead``) reads as the OSError of a broken stream."""

    def __init__(self, response: Any) -> None:
        self.response = response

    def read(self, size: int, /) -> bytes:
        try:
            data: bytes = self.response.read(size)
        except http.client.HTTPException as exc:
            raise OSError(str(exc)) from exc
        return data


def _range_start(response: Any) -> int | None:
    content_range = response.headers.get("Content-Range", "")
    first = content_range.removeprefix("bytes ").partition("-")[0]
    return int(first) if first.isdigit() else None


def _failed(image: Image, reason: str) -> None:
    imports.fail(image, reason)
    logger.info("image %s import failed: %s", image.pk, reason)
    _record(stored_image=image, status=400, error="import_failed")


def _record(*, stored_image: Image, status: int, error: str = "") -> None:
    """The import's end in the audit trail (``image.upload``, by no user: the control worker)."""
    detail: dict[str, Any] = {"source": "url"}
    if error:
        detail["error"] = error
    audit_record(
        action=AuditAction.IMAGE_UPLOAD,
        actor_id=None,
        project_id=stored_image.project_id,
        target_id=str(stored_image.pk),
        request_id="",
        status=status,
        detail=detail,
    )
