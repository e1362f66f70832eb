"""The mixed data set: deterministic, exact in size, half of each tree, comparable by its manifest."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from bench.dwcp.mixed import interleave, make_mixed

SHARED_OBJECT = re.compile(r"\.so(\.\d+)*$")


def tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return root


@pytest.fixture
def roots(tmp_path: Path) -> list[tuple[Path, re.Pattern[str] | None]]:
    libraries = tree(
        tmp_path / "lib",
        {"b/libb.so.1": b"B" * 3000, "a/liba.so": b"A" * 5000, "a/notes.txt": b"not a library"},
    )
    (libraries / "a" / "link.so").symlink_to(libraries / "a" / "liba.so")
    shared = tree(
        tmp_path / "share", {"doc/one": b"1" * 1000, "doc/two": b"2" * 1000, "icons/x": b"x" * 2000}
    )
    return [(libraries, SHARED_OBJECT), (shared, None)]


def test_the_same_trees_give_the_same_bytes_and_manifest(
    tmp_path: Path, roots: list[tuple[Path, re.Pattern[str] | None]]
) -> None:
    first = make_mixed(tmp_path / "first.bin", 9000, roots)
    second = make_mixed(tmp_path / "second.bin", 9000, roots)
    assert first == second
    assert (tmp_path / "first.bin").read_bytes() == (tmp_path / "second.bin").read_bytes()
    assert first.data_sha256 == hashlib.sha256((tmp_path / "first.bin").read_bytes()).hexdigest()


def test_files_alternate_by_bytes_in_path_order_and_the_last_one_is_cut(
    tmp_path: Path, roots: list[tuple[Path, re.Pattern[str] | None]]
) -> None:
    manifest = make_mixed(tmp_path / "mixed.bin", 9000, roots)
    # lib/a/liba.so (5000), then share until it has given more: one, two, x (4000 in all), then libb cut
    expected = b"A" * 5000 + b"1" * 1000 + b"2" * 1000 + b"x" * 2000
    assert (tmp_path / "mixed.bin").read_bytes() == expected
    assert manifest.size == 9000
    assert manifest.files == 4  # the symlink, the text file under lib and the cut-off library are not read
    assert not manifest.repeated
    listing = "".join(
        f"{path}\t{length}\n"
        for path, length in [
            (roots[0][0] / "a/liba.so", 5000),
            (roots[1][0] / "doc/one", 1000),
            (roots[1][0] / "doc/two", 1000),
            (roots[1][0] / "icons/x", 2000),
        ]
    )
    assert manifest.list_sha256 == hashlib.sha256(listing.encode()).hexdigest()


def test_the_list_starts_over_only_when_the_trees_are_too_small(
    tmp_path: Path, roots: list[tuple[Path, re.Pattern[str] | None]]
) -> None:
    manifest = make_mixed(tmp_path / "mixed.bin", 20000, roots)
    data = (tmp_path / "mixed.bin").read_bytes()
    assert len(data) == 20000
    assert manifest.repeated
    assert manifest.distinct_files == 5
    assert data[12000:17000] == b"A" * 5000  # the second pass begins with the first file again


def test_interleave_takes_from_the_tree_that_gave_fewest_bytes() -> None:
    big = [(Path("/l/1"), 10), (Path("/l/2"), 10)]
    small = [(Path("/s/1"), 3), (Path("/s/2"), 3), (Path("/s/3"), 3), (Path("/s/4"), 3)]
    order = [str(path) for path, _ in interleave([big, small])]
    assert order == ["/l/1", "/s/1", "/s/2", "/s/3", "/s/4", "/l/2"]


def test_a_size_of_zero_or_no_readable_files_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="positive size"):
        make_mixed(tmp_path / "mixed.bin", 0, [(empty, None)])
    with pytest.raises(ValueError, match="no readable files"):
        make_mixed(tmp_path / "mixed.bin", 100, [(empty, None)])
