"""Receiving an image's file into the store, the one path of uploads, URL imports and the CLI.

Invariants: bytes are written only to the store's hidden ``.partial/<image id>`` file, only by the
holder of the image's import lock (a lock of the store, :func:`apps.images.store.store_lock`: a
second upload or import of the same image is a 409, and a process that dies frees it); a cut
connection keeps what was written, and the next chunk must start exactly there. When the last byte
is held the file is verified (:func:`apps.images.probe.verify`): accepted, it moves to its content
address and the image is ``ready``; refused, the partial file is removed and the image is
``failed`` with the reason (it can be uploaded again). The row's ``size_bytes`` holds the announced
total while the file arrives and ``checksum`` the sha256 the uploader expects.
"""

import hashlib
import math
import re
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO, Final, Protocol

from django.db import transaction

from apps.core.conf import novacron_setting
from apps.core.errors import Conflict, InvalidInput, NovaCronError
from apps.vms.choices import ImageStatus
from apps.vms.models import Image

from .probe import GIB, ImageRefused, verify
from .store import discard_partial, held_bytes, is_valid_sha256, keep, partial_path, store_lock

CHUNK: Final = 1 << 20
RECEIVING: Final = frozenset({ImageStatus.PENDING, ImageStatus.UPLOADING, ImageStatus.FAILED})
_CONTENT_RANGE = re.compile(r"bytes (\d{1,19})-(\d{1,19})/(\d{1,19})")


class Readable(Protocol):
    def read(self, size: int, /) -> bytes: ...


class OffsetMismatch(Conflict):
    """A chunk that does not start where the held bytes end; ``held`` says where to resume."""

    def __init__(self, held: int, start: int) -> None:
        super().__init__(
            f"The server holds {held} bytes of this image; a chunk must start there, not at {start}."
        )
        self.held = held


@dataclass(frozen=True)
class Chunk:
    """Where a request's body goes: ``length`` bytes at ``start`` of a file of ``total`` bytes."""

    start: int
    length: int
    total: int


def max_bytes() -> int:
    return int(novacron_setting("IMAGE_MAX_SIZE_GB")) * GIB


class TooLarge(NovaCronError):
    code = "too_large"
    status = 413


def check_size(total: int) -> None:
    if total > max_bytes():
        limit = novacron_setting("IMAGE_MAX_SIZE_GB")
        raise TooLarge(f"The file has {total} bytes; the store takes images up to {limit} GiB.")


def chunk_of(content_range: str | None, content_length: int) -> Chunk:
    """The chunk a request announces: ``Content-Range: bytes START-END/TOTAL``, or without it the
    whole file (``content_length`` bytes from 0)."""
    if not content_range:
        chunk = Chunk(0, content_length, content_length)
    else:
        match = _CONTENT_RANGE.fullmatch(content_range.strip())
        if match is None:
            raise InvalidInput(f"Content-Range must be 'bytes START-END/TOTAL', not {content_range[:80]!r}.")
        start, end, total = (int(part) for part in match.groups())
        if not start <= end < total:
            raise InvalidInput(f"Content-Range {content_range!r}: START <= END < TOTAL is required.")
        chunk = Chunk(start, end - start + 1, total)
        if chunk.length != content_length:
            raise InvalidInput(
                f"Content-Range announces {chunk.length} bytes; the body has {content_length}."
            )
    if chunk.total == 0:
        raise InvalidInput("The body is empty: send the image file (application/octet-stream).")
    check_size(chunk.total)
    return chunk


@contextmanager
def import_lock(image_id: int) -> Iterator[None]:
    """Hold image ``image_id``'s import lock for the block, or raise :class:`Conflict`."""
    with store_lock(f"image-{int(image_id)}", wait=False) as held:
        if not held:
            raise Conflict("Another upload or import of this image is in progress; try again when it ends.")
        yield


def content_lock(sha256: str) -> AbstractContextManager[bool]:
    """The store's file of ``sha256`` for the block, which holds the transaction that moves a file in
    and saves its image row, or that deletes its last image and removes it: never both at once.
    Take it outside the transaction (``with content_lock(x), transaction.atomic():``), so it is held
    until the commit."""
    if not is_valid_sha256(sha256):
        raise ValueError(f"not a sha256 in lowercase hex: {sha256!r}")
    return store_lock(sha256, wait=True)


def received_bytes(image: Image) -> int | None:
    """How much of the file the store holds while it arrives (None once it is stored or refused)."""
    if image.status not in (ImageStatus.UPLOADING, ImageStatus.IMPORTING):
        return None
    return held_bytes(image.pk)


def _check_receivable(image: Image) -> None:
    if image.path or image.kernel_path:
        raise Conflict(f"Image {image.name} is registered by path on the nodes; it has no file to upload.")
    if image.status == ImageStatus.READY:
        raise Conflict(f"Image {image.name} already has its file; create another image for new content.")
    if image.status == ImageStatus.IMPORTING:
        raise Conflict(f"Image {image.name} is being imported from its URL; it takes no upload.")


def receive(image: Image, body: Readable, chunk: Chunk) -> Image:
    """Write ``chunk`` of ``image``'s file from ``body`` (under :func:`import_lock`); verify and store
    the file when its last byte arrived. Raises :class:`OffsetMismatch`, :class:`ImageRefused` (the
    image is then ``failed``) or :class:`InvalidInput` when the body ended early (what arrived is kept)."""
    image = Image.objects.get(pk=image.pk)
    _check_receivable(image)
    held = held_bytes(image.pk)
    if chunk.start and chunk.start != held:
        raise OffsetMismatch(held, chunk.start)
    if chunk.start and image.size_bytes and chunk.total != image.size_bytes:
        raise InvalidInput(
            f"This upload's file has {image.size_bytes} bytes, not {chunk.total};"
            " to start again, send from byte 0."
        )
    Image.objects.filter(pk=image.pk).update(
        status=ImageStatus.UPLOADING, status_reason="", size_bytes=chunk.total
    )
    digest = hashlib.sha256() if chunk.start == 0 else None
    written = append(image.pk, body, chunk.length, start=chunk.start, digest=digest)
    if written < chunk.length:
        raise InvalidInput(
            f"The body ended after {written} of {chunk.length} bytes; the server holds"
            f" {chunk.start + written}: resume from there with Content-Range."
        )
    image.refresh_from_db()
    if chunk.start + written < chunk.total:
        return image
    return finish(image, sha256=digest.hexdigest() if digest is not None else "")


def append(image_id: int, body: Readable, length: int, *, start: int, digest: Any = None) -> int:
    """Copy up to ``length`` bytes of ``body`` to the partial file from ``start`` (0: a new file), in
    chunks of a MiB; return how many arrived (fewer when the body ends or breaks: those are kept)."""
    path = partial_path(image_id)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    written = 0
    with path.open("r+b" if start else "wb") as file:
        file.seek(start)
        file.truncate()
        while written < length:
            try:
                data = body.read(min(CHUNK, length - written))
            except OSError:  # the client went away (Django's UnreadablePostError is one)
                break
            if not data:
                break
            file.write(data)
            if digest is not None:
                digest.update(data)
            written += len(data)
    return written


def finish(image: Image, *, sha256: str = "") -> Image:
    """Verify the complete partial file of ``image`` and store it, or refuse it (module docstring)."""
    try:
        verified = verify(
            partial_path(image.pk), declared=image.format, expected_sha256=image.checksum, sha256=sha256
        )
    except ImageRefused as refused:
        fail(image, refused.message)
        raise
    with content_lock(verified.sha256), transaction.atomic():
        keep(image.pk, verified.sha256)
        image = Image.objects.select_for_update().get(pk=image.pk)
        image.sha256 = image.checksum = verified.sha256
        image.size_bytes = verified.size_bytes
        image.virtual_size_bytes = verified.virtual_size_bytes
        image.min_disk_gb = max(image.min_disk_gb, math.ceil(verified.virtual_size_bytes / GIB))
        image.status, image.status_reason = ImageStatus.READY, ""
        image.save()
    return image


def fail(image: Image, reason: str) -> None:
    """Drop what arrived of ``image``'s file and mark it ``failed`` with ``reason``."""
    discard_partial(image.pk)
    Image.objects.filter(pk=image.pk).update(
        status=ImageStatus.FAILED, status_reason=reason[:500], size_bytes=0, virtual_size_bytes=0
    )


def receive_file(image: Image, source: BinaryIO, size: int) -> Image:
    """Store a whole local file as ``image``'s (the operators' command)."""
    check_size(size)
    with import_lock(image.pk):
        return receive(image, source, Chunk(0, size, size))
