"""``manage.py image_import``: a local file or a URL through the same verification; idempotent for
the same content; other content only with ``--replace`` and only when no VM uses the image."""

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.core.management import CommandError, call_command

from apps.vms.models import VM, Image
from tests.apps.images.conftest import stored_files
from tests.apps.images.test_url_import import Files, http_files  # noqa: F401 - the fixture

pytestmark = pytest.mark.django_db


def _run(*args: str, **options: Any) -> str:
    out = io.StringIO()
    call_command("image_import", *args, stdout=out, **options)
    return out.getvalue()


def test_import_is_idempotent_and_replaces_only_when_asked(
    store: Path, disks: Callable[..., Path], user: Any, node: Any, django_capture_on_commit_callbacks: Any
) -> None:
    first, second = disks("qcow2", size="1G"), disks("qcow2", size="2G")
    shown = _run("debian-12", str(first), format="qcow2", os_type="linux", os_version="12", min_memory_mb=512)
    assert "imported" in shown
    image = Image.objects.get(name="debian-12")
    assert (image.status, image.project_id, image.visibility, image.os_version) == (
        "ready",
        None,
        "shared",
        "12",
    )
    assert (image.min_disk_gb, image.min_memory_mb) == (1, 512)
    assert "unchanged" in _run("debian-12", str(first), format="qcow2")
    with pytest.raises(CommandError, match="--replace"):
        _run("debian-12", str(second), format="qcow2")
    vm = VM.objects.create(owner=user, name="vm", image=image, node=node, vcpus=1, memory_mb=64, disk_gb=1)
    with pytest.raises(CommandError, match="used by 1 VM"):
        _run("debian-12", str(second), format="qcow2", replace=True)
    assert list(Image.objects.values_list("name", "sha256")) == [("debian-12", image.sha256)]
    VM.objects.filter(pk=vm.pk).delete()
    with django_capture_on_commit_callbacks(execute=True):
        assert "replaced" in _run("debian-12", str(second), format="qcow2", replace=True)
    replaced = Image.objects.get(name="debian-12")
    assert replaced.pk != image.pk and replaced.virtual_size_bytes == 2 * 1024**3
    assert stored_files(store) == [replaced.sha256]


def test_a_refused_file_leaves_nothing(store: Path, disks: Callable[..., Path]) -> None:
    with pytest.raises(CommandError, match="backing file"):
        _run("hostile", str(disks("backing")), format="qcow2")
    with pytest.raises(CommandError, match="no such file"):
        _run("missing", "/nonexistent/disk.qcow2", format="qcow2")
    with pytest.raises(CommandError, match="Only http"):
        _run("ftp", "ftp://example.org/disk.qcow2", format="qcow2")
    assert not Image.objects.exists() and stored_files(store) == []


def test_import_from_a_url(store: Path, disks: Callable[..., Path], http_files: tuple[Files, str]) -> None:  # noqa: F811
    served, base = http_files
    served.files["/disk.raw"] = disks("raw").read_bytes()
    assert "imported" in _run("raw-disk", f"{base}/disk.raw", format="raw", visibility="shared")
    assert Image.objects.get(name="raw-disk").status == "ready"
    assert "unchanged" in _run("raw-disk", f"{base}/disk.raw", format="raw")
