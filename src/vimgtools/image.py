"""Disk images as files or block devices: size, allocation map, windowed reads, hole punching, locks.

References: lseek(2) SEEK_DATA/SEEK_HOLE, fallocate(2) FALLOC_FL_PUNCH_HOLE, preadv2(2) RWF_NOWAIT,
posix_fadvise(2), cachestat(2) (Linux 6.5), mincore(2), fcntl(2) open file description locks (what
QEMU takes on its images).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from vimgtools import _linux
from vimgtools.errors import ImageError, ImageRefused, InvalidInput

if TYPE_CHECKING:
    from typing_extensions import Buffer

_BLKGETSIZE64 = 0x80081272

# QEMU's file-posix driver locks single bytes of the image with OFD locks:
# 100 + bit for the permissions it holds, 200 + bit for those it refuses to share.
QEMU_LOCK_PERM_BASE = 100
QEMU_PERM_WRITE_BIT = 1  # BLK_PERM_WRITE = 1 << 1
_QEMU_LOCK_SPAN = 100  # bytes 100..299 cover every permission bit QEMU knows

# Page-cache residency (see Image.cache_probe): cachestat(2) since Linux 6.5, else mincore(2)
# over a mapping (both in _linux: through ctypes they cost every start 5-6 ms).
_PAGE = os.sysconf("SC_PAGE_SIZE")
CACHE_PROBES = ("cachestat", "mincore", "nowait")
# Pages asked for per POSIX_FADV_WILLNEED call: the kernel reads at most max(read_ahead_kb,
# max_sectors_kb) per call (mm/readahead.c force_page_cache_ra), 128 KiB on some devices.
_WILLNEED_STEP = 128 << 10
_RESIDENT = bytes.maketrans(bytes(range(256)), bytes(i & 1 for i in range(256)))


Residency = bool | bytes  # True: every page cached; False: none; else one byte per page, 1 = cached


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a range to disk without waiting, so that the fsync that follows waits less.

    Durability still comes only from fsync; this just overlaps the device's work with ours.
    """
    with contextlib.suppress(OSError):  # a hint: where it fails (a pipe, ESPIPE) fsync does it all
        _linux.start_writeback(fd, offset, length)


def describe_os_error(e: OSError) -> str:
    return e.strerror or str(e)


def _describe_mode(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "not a regular file" if not stat.S_ISREG(mode) else "a file"


def _kind(path: Path) -> str:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "file"
    return "file" if stat.S_ISREG(mode) else _describe_mode(mode)


def open_regular(path: Path, what: str) -> int:
    """Open a file we only read (a journal, undo, delta, signature) without blocking on a FIFO.

    Raises InvalidInput when ``path`` is not a regular file; OSError as ``os.open`` does.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise InvalidInput(f"{path}: is {_describe_mode(mode)}, not a {what}")
    os.set_blocking(fd, True)
    return fd


class Image:
    """An open image: a regular file or a block device, read as raw bytes.

    The interface every image has: ``nbd.NbdImage`` (any QEMU format, through NBD) is the
    other backend, and ``images.open_image`` picks one.

    Args:
        path: the file or device.
        write: open for writing (O_RDWR) instead of read-only.
    """

    format = "raw"
    cluster_size = 0  # of a qcow2: what a replica created from it gets
    request_size = 0  # the smallest read worth making (0: any); readers read pieces at least this big

    def __init__(self, path: str | os.PathLike[str], *, write: bool = False) -> None:
        self.path = Path(path)
        self.write = write
        # O_NONBLOCK: a FIFO must be refused, not waited on (it is cleared once we know what this is).
        flags = (os.O_RDWR if write else os.O_RDONLY) | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
        try:
            self.fd = os.open(self.path, flags)
        except FileNotFoundError:
            raise InvalidInput(f"{self.path}: no such file or device") from None
        except IsADirectoryError:
            raise InvalidInput(f"{self.path}: is a directory, not an image") from None
        except OSError as e:
            if e.errno == errno.ENXIO and _kind(self.path) != "file":  # a FIFO with no reader, a socket
                raise InvalidInput(
                    f"{self.path}: is {_kind(self.path)}, not a file or block device"
                ) from None
            mode = "writing" if write else "reading"
            raise ImageError(f"{self.path}: cannot open for {mode}: {describe_os_error(e)}") from e
        st = os.fstat(self.fd)
        self.stat = st
        self.is_block = stat.S_ISBLK(st.st_mode)
        if not (self.is_block or stat.S_ISREG(st.st_mode)):
            os.close(self.fd)
            raise InvalidInput(f"{self.path}: is {_describe_mode(st.st_mode)}, not a file or block device")
        os.set_blocking(self.fd, True)
        self.size = self._device_size() if self.is_block else st.st_size
        self._seek_data_ok = not self.is_block
        self._nowait_ok = True
        self._probe: str | None = None
        self._step: int | None = None

    @property
    def chain(self) -> list[dict[str, str]]:
        """The image and its backing files, as ``qemu-img info --backing-chain`` lists them."""
        return [{"filename": str(self.path), "format": self.format}]

    # -- identity -------------------------------------------------------
    @property
    def identity(self) -> tuple[int, int]:
        """(device, inode) for files; (0, rdev) for block devices."""
        if self.is_block:
            return (0, self.stat.st_rdev)
        return (self.stat.st_dev, self.stat.st_ino)

    def still_at_path(self) -> bool:
        """Whether the path still names the file we hold open (not deleted or replaced)."""
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        if self.is_block:
            return stat.S_ISBLK(st.st_mode) and st.st_rdev == self.stat.st_rdev
        return (st.st_dev, st.st_ino) == (self.stat.st_dev, self.stat.st_ino)

    def _device_size(self) -> int:
        buf = bytearray(8)
        fcntl.ioctl(self.fd, _BLKGETSIZE64, buf)
        return int(struct.unpack("Q", buf)[0])

    def refresh_size(self) -> int:
        self.stat = os.fstat(self.fd)
        self.size = self._device_size() if self.is_block else self.stat.st_size
        return self.size

    # -- allocation -----------------------------------------------------
    def next_data(self, offset: int) -> int:
        """The first offset at or after ``offset`` that may hold data (the size when none does)."""
        if offset >= self.size:
            return self.size
        if not self._seek_data_ok:
            return offset
        try:
            return min(os.lseek(self.fd, offset, os.SEEK_DATA), self.size)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return self.size
            return offset

    def data_in(self, offset: int, length: int) -> list[tuple[int, int]]:
        """The allocated (offset, length) pieces of [offset, offset+length); all of it when unknown."""
        end = min(offset + length, self.size)
        if offset >= end:
            return []
        if not self._seek_data_ok:
            return [(offset, end - offset)]
        out: list[tuple[int, int]] = []
        pos = offset
        while pos < end:
            try:
                start = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                    self._seek_data_ok = False
                    return [(offset, end - offset)]
                raise ImageError(f"{self.path}: SEEK_DATA at {pos}: {describe_os_error(e)}") from e
            if start >= end:
                break
            stop = min(os.lseek(self.fd, start, os.SEEK_HOLE), end)
            out.append((start, stop - start))
            pos = stop
        return out

    def data_extents(self) -> list[tuple[int, int]]:
        """Allocated (offset, length) extents; the whole image when the filesystem cannot tell."""
        if not self._seek_data_ok:
            return [(0, self.size)] if self.size else []
        out: list[tuple[int, int]] = []
        pos = 0
        while pos < self.size:
            try:
                start = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                raise ImageError(f"{self.path}: SEEK_DATA: {describe_os_error(e)}") from e
            end = os.lseek(self.fd, start, os.SEEK_HOLE)
            out.append((start, min(end, self.size) - start))
            pos = end
        return out

    # -- reading --------------------------------------------------------
    def read_into(self, buf: memoryview, offset: int, *, probe: bool = True) -> tuple[int, int]:
        """Fill ``buf`` from ``offset``; bytes past the end read as zeros.

        Returns (bytes read from the image, how many of ``buf``'s first bytes came from the page
        cache). The second value lets a caller evict what it alone brought in (see ``drop_cache``);
        it is learned by trying the read with RWF_NOWAIT first, which returns the cached pages
        up to the first one that is not. With ``probe`` False the read is a plain one (the caller
        learned residency before, see ``residency``) and the second value is 0.
        """
        want = len(buf)
        got = 0
        if probe and self._nowait_ok and not self.is_block:
            try:
                got = os.preadv(self.fd, [buf], offset, os.RWF_NOWAIT)
            except BlockingIOError:
                got = 0
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise self._read_error(offset, e) from e
                self._nowait_ok = False
        end_in_file = max(0, min(want, self.size - offset))
        cached = want if got >= end_in_file else got
        while got < end_in_file:
            try:
                n = os.preadv(self.fd, [buf[got:end_in_file]], offset + got)
            except OSError as e:
                raise self._read_error(offset + got, e) from e
            if n == 0:
                raise ImageError(f"{self.path}: unexpected end of image at offset {offset + got}")
            got += n
        if got < want:
            buf[got:] = bytes(want - got)
        return got, cached if probe else 0

    def _read_error(self, offset: int, e: OSError) -> ImageError:
        return ImageError(f"{self.path}: read error at offset {offset}: {describe_os_error(e)}")

    def dirty_in(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Extents of [offset, offset+length) a dirty bitmap marks as written: only a qcow2 has
        bitmaps (``nbd.NbdImage`` answers); a raw image is refused when opened with one."""
        raise InvalidInput(f"{self.path}: a raw image has no dirty bitmaps (only qcow2 keeps them)")

    def no_readahead(self) -> None:
        """Read exactly what is asked: no kernel readahead on this open file (POSIX_FADV_RANDOM).

        Kernel readahead would bring in pages beyond what we read, pages we would not know
        to give back. Readers ask for what they will read instead (``prefetch``).
        """
        with contextlib.suppress(OSError):
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)

    def read_back(
        self, buf: memoryview, offset: int, *, keep: bool = False, cached_only: bool = False
    ) -> int | None:
        """``read_into``, giving back the pages this read brought into the page cache (unless ``keep``).

        With ``cached_only`` None when any of it was not cached (the caller reads it another
        way). Residency is learned before reading (``residency``) where the kernel tells it:
        a probe by reading cannot tell a page its own attempt read in from a cached one. Where
        it does not ("nowait"), the read is tried with RWF_NOWAIT first; that attempt starts
        the read of what is missing, and a device that answers within the call makes those
        pages look cached (they then stay; measured: the last page of a file, ~1 run in 8).
        """
        if keep and not cached_only:
            return self.read_into(buf, offset, probe=False)[0]
        base = offset - offset % _PAGE
        r = None if self.cache_probe() == "nowait" else self.residency(base, offset + len(buf) - base)
        if r is None:
            got, cached = self.read_into(buf, offset)
            if cached < len(buf) and not keep:  # from the first page that was not cached
                first = (offset + cached) // _PAGE * _PAGE
                self.drop_cache(first, -(-(offset + len(buf)) // _PAGE) * _PAGE - first)
            return None if cached_only and cached < len(buf) else got
        if cached_only and r is not True:
            return None
        got, _ = self.read_into(buf, offset, probe=False)
        if not keep:
            self.give_back(base, r, offset, len(buf))
        return got

    def give_back(self, base: int, r: Residency, offset: int, length: int) -> None:
        """Drop the pages of [offset, offset+length) that were not cached: ``r`` is the residency
        of the pages from ``base`` (page-aligned, at or before ``offset``) noted before reading."""
        first, stop = (offset - base) // _PAGE, -(-(offset - base + length) // _PAGE)
        if r is True:
            return
        if r is False:
            self.drop_cache(base + first * _PAGE, (stop - first) * _PAGE)
            return
        i = first
        while i < stop:  # runs of pages that were not cached
            j = r.find(0, i, stop)
            if j < 0:
                break
            k = r.find(1, j, stop)
            k = stop if k < 0 else k
            self.drop_cache(base + j * _PAGE, (k - j) * _PAGE)
            i = k

    def drop_cache(self, offset: int, length: int) -> None:
        """Tell the kernel we are done with this range (a nightly run must not evict the host's cache)."""
        with contextlib.suppress(OSError):
            os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_DONTNEED)

    def cache_probe(self) -> str:
        """How this image's page-cache residency is learned: "cachestat", "mincore" or "nowait".

        cachestat(2) (Linux >= 6.5) counts the cached pages of a range; where a chunk is partly
        cached, mincore(2) over a mapping of it says which. Both answer truly only to a caller
        who owns the file or may write it (root here; Linux restricts them as a side channel
        otherwise): for anyone else, and where neither works, "nowait": each read is tried with
        RWF_NOWAIT first (``read_into``), which needs kernel readahead off and no prefetching.
        ``$VIMGTOOLS_CACHE_PROBE`` forces one (for tests and the benchmarks).
        """
        if self._probe is None:
            forced = os.environ.get("VIMGTOOLS_CACHE_PROBE", "")
            trusted = os.geteuid() in (0, self.stat.st_uid) or os.access(self.path, os.W_OK)
            if forced in CACHE_PROBES:
                self._probe = forced
            elif not trusted:
                self._probe = "nowait"
            elif self._cachestat(0, _PAGE) is not None:
                self._probe = "cachestat"
            elif self._mincore(0, _PAGE) is not None:
                self._probe = "mincore"
            else:
                self._probe = "nowait"
        return self._probe

    def residency(self, offset: int, length: int) -> Residency | None:
        """Which pages of [offset, offset+length) are in the page cache (None: cannot tell).

        ``offset`` must be page-aligned. True: all of them; False: none; else one byte per page,
        1 for cached. Past the end of the image nothing is cached.
        """
        length = max(0, min(length, self.size - offset))
        pages = -(-length // _PAGE)
        if not pages:
            return True
        if self.cache_probe() == "cachestat":
            n = self._cachestat(offset, length)
            if n is not None and (n == 0 or n >= pages):
                return n > 0
        vec = self._mincore(offset, length)
        if vec is None:
            return None
        vec = vec.translate(_RESIDENT)
        if vec.count(0) == 0:
            return True
        return False if vec.count(1) == 0 else vec

    def _cachestat(self, offset: int, length: int) -> int | None:
        try:
            return _linux.cachestat(self.fd, offset, length)
        except OSError:  # ENOSYS before 6.5, EPERM under seccomp, ...: cannot tell
            return None

    def _mincore(self, offset: int, length: int) -> bytes | None:
        if length <= 0:
            return b""
        try:
            return _linux.mincore(self.fd, offset, length)
        except OSError:  # not mappable (some devices), ENOMEM, ...: cannot tell
            return None

    def prefetch(self, offset: int, length: int) -> None:
        """Start reading [offset, offset+length) into the page cache without waiting (POSIX_FADV_WILLNEED)."""
        step = self._prefetch_step()
        with contextlib.suppress(OSError):
            for o in range(offset, offset + length, step):
                os.posix_fadvise(self.fd, o, min(step, offset + length - o), os.POSIX_FADV_WILLNEED)

    def _prefetch_step(self) -> int:
        """The most one WILLNEED reads: max(read_ahead_kb, max_sectors_kb) of the device, from sysfs."""
        if self._step is None:
            dev = self.stat.st_rdev if self.is_block else self.stat.st_dev
            base = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
            queue = base / "queue" if (base / "queue").is_dir() else base / ".." / "queue"
            kib = 0
            for f in (
                queue / "read_ahead_kb",
                queue / "max_sectors_kb",
                Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"),
            ):
                with contextlib.suppress(OSError, ValueError):
                    kib = max(kib, int(f.read_text()))
            self._step = min(max(_WILLNEED_STEP, kib << 10), 8 << 20)
        return self._step

    # -- writing --------------------------------------------------------
    def pwrite_all(self, data: Buffer, offset: int) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            try:
                done += os.pwrite(self.fd, view[done:], offset + done)
            except OSError as e:
                raise ImageError(
                    f"{self.path}: write error at offset {offset + done}: {describe_os_error(e)}"
                ) from e
        return done

    def zero_range(self, offset: int, length: int) -> int:
        """Make [offset, offset+length) read as zeros: punch a hole, else write zeros.

        Returns the bytes written (0 when punched).
        """
        try:
            _linux.punch_hole(self.fd, offset, length)
            return 0
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENODEV):  # those: cannot punch here
                why = describe_os_error(e)
                raise ImageError(f"{self.path}: punching a hole at offset {offset}: {why}") from e
        zeros = bytes(min(length, 1 << 20))
        done = 0
        while done < length:
            n = min(len(zeros), length - done)
            self.pwrite_all(memoryview(zeros)[:n], offset + done)
            done += n
        return length

    def truncate(self, size: int) -> None:
        if self.is_block:
            return
        try:
            os.ftruncate(self.fd, size)
        except OSError as e:
            raise ImageError(f"{self.path}: resizing to {size} bytes: {describe_os_error(e)}") from e
        self.size = size

    def start_writeback(self) -> None:
        """Start writing what we wrote to the disk without waiting (the fsync that follows waits less)."""
        start_writeback(self.fd, 0, 0)

    def fsync(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as e:
            raise ImageError(f"{self.path}: flushing to disk: {describe_os_error(e)}") from e

    # -- QEMU locks -----------------------------------------------------
    def qemu_lock(self) -> str | None:
        """Who holds QEMU-style OFD locks on this image: None, "reader" or "writer".

        QEMU locks byte 100 + n for each permission n it holds; byte 101 is "write".
        """
        if self._ofd_conflict(QEMU_LOCK_PERM_BASE + QEMU_PERM_WRITE_BIT, 1):
            return "writer"
        if self._ofd_conflict(QEMU_LOCK_PERM_BASE, 2 * _QEMU_LOCK_SPAN):
            return "reader"
        return None

    def _ofd_conflict(self, start: int, length: int) -> bool:
        # struct flock: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid
        req = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, start, length, 0)
        try:
            res = fcntl.fcntl(self.fd, fcntl.F_OFD_GETLK, req)
        except OSError:
            return False
        return bool(struct.unpack("hhqqi4x", res)[0] != fcntl.F_UNLCK)

    def lock_exclusive(self, what: str) -> None:
        """flock() the image so that two vimgtools runs never write it at once (QEMU uses OFD locks)."""
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ImageRefused(f"{self.path}: another vimgtools {what} is using this image") from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fsync_dir(path: Path) -> None:
    """Make a created, renamed or removed directory entry durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
