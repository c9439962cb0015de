"""exporter.safefile: a FIFO, a device, a directory or a huge file is refused at once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from exporter.safefile import UnsafeFileError, read_regular_file


def test_a_regular_file_is_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    assert read_regular_file(path, 100) == b"x" * 100


@pytest.mark.timeout(10)
def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(UnsafeFileError, match="not a regular file"):
        read_regular_file(fifo, 1024)


@pytest.mark.timeout(10)
def test_dev_zero_is_refused_at_once() -> None:
    with pytest.raises(UnsafeFileError, match="not a regular file"):
        read_regular_file("/dev/zero", 1024)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: None, "file not found"),
        (lambda p: p.write_bytes(b"y" * 2049), "file too large"),
    ],
)
def test_what_is_refused_is_named_in_one_short_reason(tmp_path: Path, make, reason) -> None:
    path = tmp_path / "target"
    make(path)
    with pytest.raises(UnsafeFileError, match=reason) as caught:
        read_regular_file(path, 2048)
    assert str(tmp_path) not in str(caught.value)  # the caller names the file


def test_a_sparse_file_over_the_cap_is_refused_by_its_size(tmp_path: Path) -> None:
    path = tmp_path / "sparse"
    with path.open("wb") as handle:
        handle.truncate(2 * 1024**3)
    with pytest.raises(UnsafeFileError, match="file too large"):
        read_regular_file(path, 1024)
