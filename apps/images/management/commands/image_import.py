"""``manage.py image_import NAME SOURCE --format qcow2|raw``: put an image in the store from a local
file or an http(s) URL, through the API's verification, for operators and scripts.

Idempotent: the same name with the same content is a no-op ("unchanged"); other content under an
existing name is refused unless ``--replace`` (and no VM record uses the image). When the name exists
the new file is imported under a temporary name first, so a refused file leaves the old image as it
was; a refused import leaves nothing (its record is removed) and exits non-zero with the reason.
"""

from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction

from apps.core.errors import NovaCronError
from apps.projects.models import Project
from apps.vms.choices import ImageFormat, ImageStatus, ImageVisibility
from apps.vms.models import Image

from ... import imports, services
from ...downloads import check_url, import_url
from ...store import file_sha256


class Command(BaseCommand):
    help = "Import an image file (a local path or an http(s) URL) into the image store, verified."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name")
        parser.add_argument("source", help="A local file, or an http:// or https:// URL.")
        parser.add_argument("--format", required=True, choices=ImageFormat.values)
        parser.add_argument("--visibility", choices=ImageVisibility.values, default=ImageVisibility.SHARED)
        parser.add_argument("--project", default="", help="The owning project (for a private image).")
        parser.add_argument("--os-type", default="")
        parser.add_argument("--os-version", default="")
        parser.add_argument("--min-disk-gb", type=int, default=0)
        parser.add_argument("--min-memory-mb", type=int, default=0)
        parser.add_argument("--sha256", default="", help="The sha256 the file must have.")
        parser.add_argument("--replace", action="store_true", help="Replace other content under NAME.")

    def handle(self, *args: Any, **options: Any) -> None:
        name, source = options["name"], options["source"]
        local = None if "://" in source else Path(source)
        if local is None:
            try:
                check_url(source)
            except NovaCronError as exc:
                raise CommandError(exc.message) from exc
        elif not local.is_file():
            raise CommandError(f"{source}: no such file (give a local file or an http(s) URL).")
        existing = Image.objects.filter(name=name).first()
        if existing is not None and existing.sha256 and self._same(existing, local, source):
            self.stdout.write(f"image {name!r} unchanged (sha256 {existing.sha256})")
            return
        if existing is not None and not options["replace"]:
            raise CommandError(
                f"An image named {name!r} exists with other content; add --replace to replace it."
            )
        try:
            image = self._import(
                name if existing is None else f"{name[:50]}.replacing", local, source, options
            )
        except NovaCronError as exc:
            raise CommandError(f"image {name!r} not imported: {exc.message}") from exc
        if existing is None:
            self.stdout.write(self.style.SUCCESS(f"image {name!r} imported ({self._shown(image)})"))
        elif existing.sha256 == image.sha256:
            services.image_delete(image=image)
            self.stdout.write(f"image {name!r} unchanged (sha256 {existing.sha256})")
        else:
            self._replace(existing, image)
            self.stdout.write(self.style.SUCCESS(f"image {name!r} replaced ({self._shown(image)})"))

    @staticmethod
    def _same(existing: Image, local: Path | None, source: str) -> bool:
        """Whether ``existing`` holds the source's content (a URL: it was imported from it)."""
        return existing.source_url == source if local is None else existing.sha256 == file_sha256(local)

    def _import(self, name: str, local: Path | None, source: str, options: dict[str, Any]) -> Image:
        """A new image ``name`` holding the source's verified file; nothing is left when it is refused."""
        project_id = None
        if options["project"]:
            project = Project.objects.filter(name=options["project"]).first()
            if project is None:
                raise CommandError(f"No project named {options['project']!r}.")
            project_id = project.pk
        elif options["visibility"] == ImageVisibility.PRIVATE:
            raise CommandError("A private image belongs to a project: add --project.")
        image = services.image_create(
            project_id=project_id,
            name=name,
            format=options["format"],
            visibility=options["visibility"],
            os_type=options["os_type"],
            os_version=options["os_version"],
            min_disk_gb=options["min_disk_gb"],
            min_memory_mb=options["min_memory_mb"],
            sha256=options["sha256"],
            source_url=source if local is None else "",
            enqueue=False,
        )
        try:
            if local is None:
                import_url(
                    image.pk
                )  # here, not by the control worker (the task sent on commit finds it done)
            else:
                with local.open("rb") as file:
                    imports.receive_file(image, file, local.stat().st_size)
            image.refresh_from_db()
        except BaseException:
            services.image_delete(image=image)
            raise
        if image.status != ImageStatus.READY:
            services.image_delete(image=image)
            raise CommandError(f"image {options['name']!r} not imported: {image.status_reason}")
        return image

    def _replace(self, old: Image, new: Image) -> None:
        """``new`` takes ``old``'s name; refused (``old`` kept, ``new`` removed) while a VM uses ``old``."""
        name = old.name
        try:
            with transaction.atomic():
                services.image_delete(image=old)
                services.image_update(image=new, name=name)
        except NovaCronError as exc:
            services.image_delete(image=new)
            raise CommandError(f"image {name!r} not replaced: {exc.message}") from exc

    @staticmethod
    def _shown(image: Image) -> str:
        return f"sha256 {image.sha256}, {image.size_bytes} bytes, virtual {image.virtual_size_bytes} bytes"
