"""Writes of image records: create (by path for staff, or a stored image awaiting its file or
importing from a URL), metadata changes, delete.

Invariants: names are unique across the catalog (a taken name is a 400 naming the field); a stored
image starts ``pending`` (``importing`` with a URL, whose task is sent after commit); a delete is
refused (409) while a VM record uses the image or its file is being received, and removes the store's
file when no other image has the same content.
"""

import math
from typing import Any

from django.db import IntegrityError, transaction

from apps.core.errors import Conflict, InvalidInput
from apps.vms import cache as vm_cache
from apps.vms.choices import ImageKind, ImageStatus, ImageVisibility, VMState
from apps.vms.models import VM, Image

from . import imports
from .downloads import check_url
from .probe import GIB
from .store import discard_partial, is_valid_sha256, store_path

#: Fields a staff-only registration by path sets (the operators' legacy images: ``testguest``).
PATH_FIELDS = ("path", "kernel_path", "initrd_path", "cmdline")


def _name_taken(name: str) -> InvalidInput:
    message = f"An image named {name!r} already exists."
    return InvalidInput(message, fields={"name": [message]})


def image_create(*, project_id: int | None, name: str, enqueue: bool = True, **fields: Any) -> Image:
    """A new image: registered by path (``path`` or ``kernel_path``: ready at once), else stored
    (``format`` required; ``source_url``: imported by the control worker, unless ``enqueue`` is
    False: the caller imports it). ``sha256``: the digest the file must have. ``project_id`` None:
    the operators' catalog."""
    expected = fields.pop("sha256", "") or ""
    if expected and not is_valid_sha256(expected):
        message = "Give the sha256 as 64 lowercase hex digits."
        raise InvalidInput(message, fields={"sha256": [message]})
    by_path = any(fields.get(field) for field in PATH_FIELDS)
    source_url = fields.get("source_url") or ""
    if source_url:
        if by_path:
            raise InvalidInput("An image is registered by path or imported from a URL, not both.")
        check_url(source_url)
    if not by_path:
        if fields.get("kind", ImageKind.DISK) != ImageKind.DISK:
            raise InvalidInput(
                "A stored image is a disk image.", fields={"kind": ["A stored image is a disk."]}
            )
        if not fields.get("format"):
            message = "Give the image's format: qcow2 or raw."
            raise InvalidInput(message, fields={"format": [message]})
        fields["status"] = ImageStatus.IMPORTING if source_url else ImageStatus.PENDING
    fields.setdefault("format", "qcow2")
    if expected:
        fields["checksum"] = expected
    image = Image(name=name, project_id=project_id, **fields)
    image.full_clean(exclude=["project"], validate_unique=False, validate_constraints=False)
    try:
        with transaction.atomic():
            image.save(force_insert=True)
            if source_url and enqueue:
                from .tasks import image_import_url  # noqa: PLC0415 - tasks import the services' modules

                transaction.on_commit(lambda: image_import_url.delay(image.pk))
    except IntegrityError:
        if Image.objects.filter(name=name).exists():
            raise _name_taken(name) from None
        raise
    return image


@transaction.atomic
def image_update(*, image: Image, **fields: Any) -> Image:
    """Change an image's name, visibility or metadata (its file never changes: import a new image)."""
    image = Image.objects.select_for_update().get(pk=image.pk)
    name = fields.get("name")
    if name and name != image.name and Image.objects.filter(name=name).exists():
        raise _name_taken(name)
    for field, value in fields.items():
        setattr(image, field, value)
    least = math.ceil(image.virtual_size_bytes / GIB)
    if image.min_disk_gb < least:
        message = f"The image's virtual size needs at least {least} GiB of disk."
        raise InvalidInput(message, fields={"min_disk_gb": [message]})
    image.full_clean(exclude=["project"], validate_unique=False, validate_constraints=False)
    image.save()
    vm_cache.fleet_changed()  # VM bodies show image names
    return image


def image_delete(*, image: Image) -> None:
    """Delete an image no VM record uses and whose file is not being received; its store file goes
    with its last image (node caches evict on their own)."""
    with imports.import_lock(image.pk), transaction.atomic():
        image = Image.objects.select_for_update().get(pk=image.pk)
        records = VM.objects.filter(image=image)
        live = records.exclude(state=VMState.DELETED).count()
        if live:
            raise Conflict(f"Image {image.name} is used by {live} VM(s); delete them first.")
        if records.exists():
            raise Conflict(f"Image {image.name} is named by the records of deleted VMs, which keep it.")
        image_id, sha256 = image.pk, image.sha256
        image.delete()
        transaction.on_commit(lambda: _drop_files(image_id, sha256))
    vm_cache.fleet_changed()


def _drop_files(image_id: int, sha256: str) -> None:
    """After a delete: the image's partial file, and its store file unless another image has it
    (under the content's lock, so a concurrent import of the same content keeps its file)."""
    discard_partial(image_id)
    if sha256:
        with imports.content_lock(sha256), transaction.atomic():
            if not Image.objects.filter(sha256=sha256).exists():
                store_path(sha256).unlink(missing_ok=True)


def is_shared(image: Image) -> bool:
    """Whether an image is everyone's (the catalog or shared): staff's alone to change."""
    return image.project_id is None or image.visibility == ImageVisibility.SHARED
