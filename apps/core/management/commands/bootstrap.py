"""``manage.py bootstrap``: idempotent first-run setup: the admin account and the test guest image."""

import json
import os
import secrets
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand

from apps.core.conf import novacron_setting
from apps.vms.choices import ImageFormat, ImageKind
from apps.vms.models import Image


class Command(BaseCommand):
    help = (
        "Create the admin user (password from NOVACRON_ADMIN_PASSWORD, else generated and printed) "
        "and register the built test guest image."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        self._ensure_admin()
        self._register_test_guest(settings.VAR_DIR / "images" / "testguest" / "manifest.json")

    def _ensure_admin(self) -> None:
        username = novacron_setting("ADMIN_USERNAME")
        user_model = get_user_model()
        password = os.environ.get("NOVACRON_ADMIN_PASSWORD", "")
        user = user_model.objects.filter(username=username).first()
        if user is not None and not password:
            self.stdout.write(
                f"admin user {username!r} exists (set NOVACRON_ADMIN_PASSWORD to reset its password)"
            )
            return
        generated = not password
        password = password or secrets.token_urlsafe(12)
        if user is None:
            user = user_model.objects.create_superuser(username=username, email="", password=password)
        else:
            user.set_password(password)
            user.save(update_fields=["password"])
        shown = password if generated else "(from NOVACRON_ADMIN_PASSWORD)"
        self.stdout.write(self.style.SUCCESS(f"admin user {username!r} password: {shown}"))

    def _register_test_guest(self, manifest_path: Path) -> None:
        if not manifest_path.exists():
            return
        manifest = json.loads(manifest_path.read_text())
        base = manifest_path.parent
        fields = {
            "kind": ImageKind.KERNEL,
            "format": ImageFormat.RAW,
            "kernel_path": str(base / manifest["kernel"]["path"]),
            "initrd_path": str(base / manifest["initrd"]["path"]),
            "cmdline": manifest.get("cmdline", "console=ttyS0"),
            "checksum": manifest["kernel"].get("sha256", ""),
            "size_bytes": manifest["kernel"].get("size", 0),
        }
        image, created = Image.objects.update_or_create(name="testguest", defaults=fields)
        self.stdout.write(f"image {image.name!r} {'registered' if created else 'updated'}")
