"""vimgtools._linux on real files: holes really punched, residency as the page cache has it, errno kept."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vimgtools import _linux, image
from vimgtools.errors import ImageError
from vimgtools.image import Image

PAGE = os.sysconf("SC_PAGE_SIZE")
KiB = 1024


@pytest.fixture
def data_file(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """1 MiB of non-zero data, on disk (fsync'd) and open read-write."""
    path = tmp_path / "data"
    path.write_bytes(b"\xa5" * (1024 * KiB))
    fd = os.open(path, os.O_RDWR)
    os.fsync(fd)
    try:
        yield path, fd
    finally:
        os.close(fd)


def test_punch_hole_deallocates_and_keeps_the_size(data_file: tuple[Path, int]) -> None:
    path, fd = data_file
    blocks = os.fstat(fd).st_blocks
    _linux.punch_hole(fd, 256 * KiB, 512 * KiB)
    st = os.fstat(fd)
    assert st.st_size == 1024 * KiB
    assert st.st_blocks == blocks - 512 * KiB // 512
    assert os.lseek(fd, 0, os.SEEK_HOLE) == 256 * KiB
    assert os.lseek(fd, 256 * KiB, os.SEEK_DATA) == 768 * KiB
    data = path.read_bytes()
    assert data[256 * KiB : 768 * KiB] == bytes(512 * KiB)
    assert data[: 256 * KiB] == data[768 * KiB :] == b"\xa5" * (256 * KiB)


def test_zero_range_punches_and_falls_back_to_writing_zeros(
    data_file: tuple[Path, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = data_file
    with Image(path, write=True) as img:
        assert img.zero_range(0, 64 * KiB) == 0  # punched, nothing written
        assert os.lseek(img.fd, 0, os.SEEK_DATA) == 64 * KiB

        def unsupported(fd: int, offset: int, length: int) -> None:
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

        monkeypatch.setattr(_linux, "punch_hole", unsupported)
        assert img.zero_range(128 * KiB, 64 * KiB) == 64 * KiB  # written as zeros instead
        assert os.lseek(img.fd, 128 * KiB, os.SEEK_HOLE) != 128 * KiB
    assert path.read_bytes()[128 * KiB : 192 * KiB] == bytes(64 * KiB)


def test_zero_range_reports_any_other_punch_error(data_file: tuple[Path, int]) -> None:
    path, _ = data_file
    message = f"punching a hole at offset 4096: {os.strerror(errno.EBADF)}"
    with Image(path) as img, pytest.raises(ImageError, match=message):  # read-only: fallocate says EBADF
        img.zero_range(4096, 4096)


def _cached_pages(fd: int, pages: int) -> list[int]:
    return [b & 1 for b in _linux.mincore(fd, 0, pages * PAGE)]


def test_cachestat_and_mincore_see_pages_read_and_dropped(data_file: tuple[Path, int]) -> None:
    _, fd = data_file
    pages = 1024 * KiB // PAGE
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # written and synced: clean, so dropped
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead: only what we read comes in
    try:
        assert _linux.cachestat(fd, 0, pages * PAGE) == 0
    except OSError as e:
        if e.errno != errno.ENOSYS:
            raise
        pytest.skip("no cachestat(2) on this kernel (before Linux 6.5)")
    assert _cached_pages(fd, pages) == [0] * pages

    for p in (0, 64, 200):
        os.pread(fd, PAGE, p * PAGE)
    vec = _cached_pages(fd, pages)
    assert vec[0] == vec[64] == vec[200] == 1
    assert vec[16:48] == [0] * 32  # far from every page read
    assert _linux.cachestat(fd, 0, pages * PAGE) == sum(vec)
    assert _linux.cachestat(fd, 64 * PAGE, PAGE) == 1
    assert _linux.cachestat(fd, 16 * PAGE, 32 * PAGE) == 0
    assert len(_linux.mincore(fd, 0, PAGE + 1)) == 2  # a page per started page

    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    assert _linux.cachestat(fd, 0, pages * PAGE) == 0
    assert _cached_pages(fd, pages) == [0] * pages


def test_residency_through_the_image(data_file: tuple[Path, int]) -> None:
    path, fd = data_file
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    with Image(path) as img:
        os.posix_fadvise(img.fd, 0, 0, os.POSIX_FADV_RANDOM)
        assert img.residency(0, 16 * PAGE) is False
        os.pread(img.fd, PAGE, 0)
        assert img.residency(0, PAGE) is True
        vec = img.residency(0, 16 * PAGE)
        assert isinstance(vec, bytes) and vec[0] == 1 and vec[8:] == bytes(8)


def test_cachestat_unavailable_falls_back_to_mincore(
    data_file: tuple[Path, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = data_file
    monkeypatch.delenv("VIMGTOOLS_CACHE_PROBE", raising=False)

    def no_cachestat(fd: int, offset: int, length: int) -> int:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(_linux, "cachestat", no_cachestat)
    with Image(path) as img:
        assert img._cachestat(0, PAGE) is None
        assert img.cache_probe() == "mincore"


def test_start_writeback_starts_it(data_file: tuple[Path, int]) -> None:
    _, fd = data_file
    os.pwrite(fd, b"\x5a" * PAGE, 0)
    _linux.start_writeback(fd, 0, 0)  # 0: to the end of the file
    os.fsync(fd)


@pytest.mark.parametrize(
    "call",
    [
        lambda fd: _linux.punch_hole(fd, 0, PAGE),
        lambda fd: _linux.start_writeback(fd, 0, 0),
        lambda fd: _linux.cachestat(fd, 0, PAGE),
        lambda fd: _linux.mincore(fd, 0, PAGE),
    ],
    ids=["punch_hole", "start_writeback", "cachestat", "mincore"],
)
def test_a_bad_fd_is_ebadf(call: Callable[[int], object], tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY)
    os.close(fd)  # a descriptor number that is surely closed
    with pytest.raises(OSError) as e:
        call(fd)
    assert e.value.errno == errno.EBADF
    assert e.value.strerror == os.strerror(errno.EBADF)


def test_errors_keep_their_errno(data_file: tuple[Path, int]) -> None:
    _, fd = data_file
    r, w = os.pipe()
    try:
        with pytest.raises(OSError) as e:
            _linux.punch_hole(w, 0, PAGE)
        assert e.value.errno == errno.ESPIPE
        with pytest.raises(OSError) as e:
            _linux.start_writeback(r, 0, 0)
        assert e.value.errno == errno.ESPIPE
        image.start_writeback(r, 0, 0)  # a hint only: its failure is not the caller's
    finally:
        os.close(r)
        os.close(w)
    with pytest.raises(OSError) as e:
        _linux.mincore(fd, 1, PAGE)  # mmap needs a page-aligned offset
    assert e.value.errno == errno.EINVAL
    assert _linux.mincore(fd, 0, 0) == b""
    with pytest.raises(OSError) as e:
        _linux.set_parent_death_signal(1000)  # no such signal
    assert e.value.errno == errno.EINVAL
