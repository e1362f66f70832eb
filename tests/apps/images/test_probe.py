"""The checks of :mod:`apps.images.probe` on files the real qemu-img made: other formats and
encrypted qcow2 are refused before qemu-img opens them; accepted files say what they are."""

from pathlib import Path

import pytest

from apps.images.probe import ImageRefused, verify
from tests.apps.images.conftest import qemu_img


@pytest.mark.parametrize(
    ("fmt", "options", "declared", "words"),
    [
        ("vmdk", (), "qcow2", "a vmdk image, not qcow2"),
        ("vmdk", ("-o", "subformat=monolithicFlat"), "raw", "a vmdk image, not raw"),
        ("vpc", (), "raw", "a vpc image, not raw"),
        ("vhdx", (), "qcow2", "a vhdx image, not qcow2"),
        ("qed", (), "qcow2", "a qed image, not qcow2"),
        ("qcow", (), "qcow2", "a qcow image, not qcow2"),
        (
            "qcow2",
            ("--object", "secret,id=s0,data=pw", "-o", "encrypt.format=luks,encrypt.key-secret=s0"),
            "qcow2",
            "encrypted",
        ),
    ],
)
def test_other_formats_and_encrypted_images_are_refused(
    tmp_path: Path, fmt: str, options: tuple[str, ...], declared: str, words: str
) -> None:
    path = tmp_path / f"disk.{fmt}"
    qemu_img("create", "-q", "-f", fmt, *options, str(path), "1M")
    with pytest.raises(ImageRefused, match=words):
        verify(path, declared=declared)


def test_an_accepted_qcow2_says_what_it_is(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(path), "5G")
    verified = verify(path, declared="qcow2")
    assert verified.virtual_size_bytes == 5 * 1024**3 and verified.size_bytes == path.stat().st_size
    assert len(verified.sha256) == 64
