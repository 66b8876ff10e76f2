"""Images in QEMU's formats (qcow2, vmdk, ...) read and written through a private NBD export.

``Export`` starts ``qemu-storage-daemon`` serving one image on an *abstract* unix socket
(nothing on the filesystem to leave behind), as a child that the kernel kills when we
die (``PR_SET_PDEATHSIG``, SIGKILL of vimgtools included), and stops it on ``close``.
``NbdImage`` is an ``Image`` whose data path goes through libnbd (Debian's
python3-libnbd): the guest's view, backing chain included; allocation from NBD block
status (``base:allocation``: holes and zero extents are never read); zero ranges written
as NBD zero requests that may deallocate, so a qcow2 replica stays sparse; ``fsync`` an
NBD flush. Its file descriptor is the image file's own (read-only): identity, mtime and
locks, as for a raw image.

References: qemu-storage-daemon(1), NBD protocol (block status, WRITE_ZEROES, FLUSH),
libnbd(3) ``nbd_block_status``, prctl(2) PR_SET_PDEATHSIG.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

from vimgtools.bindings import BindingsMissing, load_nbd
from vimgtools.children import die_with_parent
from vimgtools.errors import ImageError
from vimgtools.formats import ImageInfo, resize
from vimgtools.image import Image

if TYPE_CHECKING:
    from typing_extensions import Buffer

log = logging.getLogger("vimgtools.nbd")

START_TIMEOUT = 30.0
MAX_REQUEST = 32 << 20  # the NBD maximum payload qemu serves
READ_REQUEST = 1 << 20  # reads are split into requests of this size, all in flight at once
STATUS_SPAN = 1 << 30  # bytes asked per block-status request
_STATE_HOLE, _STATE_ZERO = 1, 2


def nbd_module() -> ModuleType:
    try:
        return load_nbd()
    except BindingsMissing as e:
        raise ImageError(str(e)) from None


def load_ahead() -> None:
    """Start loading libnbd's bindings in a thread (0.08 s cold): for a caller with waiting to do
    first (a running QEMU or libvirt taking the moment). If they are missing, opening says so."""

    def load() -> None:
        with contextlib.suppress(ImageError):
            nbd_module()

    threading.Thread(target=load, daemon=True).start()


class Export:
    """qemu-storage-daemon serving one image as NBD export ``img`` on a private abstract socket."""

    def __init__(
        self,
        info: ImageInfo,
        *,
        write: bool,
        force_share: bool,
        ignore_locks: bool,
        bitmap: str | None = None,
    ) -> None:
        self.info = info
        self.bitmap = bitmap
        self.address = f"\0vimgtools-{os.getpid()}-{os.urandom(8).hex()}"
        file: dict[str, Any] = {"driver": "file", "filename": str(info.path)}
        node: dict[str, Any] = {
            "driver": info.format,
            "node-name": "img",
            "read-only": not write,
            "file": file,
        }
        if write:  # zero requests may deallocate: the replica stays sparse
            node["discard"] = file["discard"] = "unmap"
        if force_share:  # a running QEMU has it open for writing: read anyway (crash-consistent only)
            node["force-share"] = file["force-share"] = True
        if ignore_locks:
            file["locking"] = "off"
        argv = [
            "qemu-storage-daemon",
            "--blockdev", json.dumps(node),
            "--nbd-server", f"addr.type=unix,addr.path={self.address[1:]},addr.abstract=on",
            "--export", f"type=nbd,id=exp,node-name=img,name=img,writable={'on' if write else 'off'}"
            + (f",bitmaps.0={bitmap}" if bitmap else ""),
        ]  # fmt: skip
        log.debug("starting %s", argv)
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                preexec_fn=die_with_parent(signal.SIGTERM),  # SIGTERM: it exits cleanly
            )
        except FileNotFoundError:
            raise ImageError(
                f"{info.path}: qemu-storage-daemon is not installed (Debian: apt-get install qemu-system-common)"
            ) from None
        self._stderr: deque[str] = deque(maxlen=20)
        threading.Thread(target=self._drain, daemon=True).start()
        self._wait_listening()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self._stderr.append(raw.decode(errors="replace").strip())

    def _said(self) -> str:
        time.sleep(0.05)  # let the drain thread take its last lines
        text = " ".join(line for line in self._stderr if line)
        return text.removeprefix("qemu-storage-daemon: ") or f"exited with {self.proc.returncode}"

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise ImageError(f"{self.info.path}: cannot export it: {self._said()}")
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.connect(self.address)
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.close()
                    raise ImageError(f"{self.info.path}: qemu-storage-daemon did not start in time") from None
                time.sleep(0.01)

    def connect(self, nbd: ModuleType) -> Any:
        """A new libnbd handle on the export (one per thread: a handle serialises its calls)."""
        h = nbd.NBD()
        h.add_meta_context("base:allocation")
        if self.bitmap:
            h.add_meta_context(f"qemu:dirty-bitmap:{self.bitmap}")
        h.set_export_name("img")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(self.address)
            h.connect_socket(s.detach())  # the handle owns the socket now
        except (OSError, nbd.Error) as e:
            s.close()
            raise ImageError(f"{self.info.path}: cannot connect to its export: {e}") from e
        return h

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()


class ServedExport:
    """An NBD export someone else serves on a unix socket: a running QEMU's own (``nbd-server-start``).

    ``bitmap`` is the dirty bitmap it exports (``qemu:dirty-bitmap:BITMAP``), if any."""

    def __init__(self, socket_path: str, name: str, *, bitmap: str | None = None) -> None:
        self.socket_path, self.name, self.bitmap = socket_path, name, bitmap

    def connect(self, nbd: ModuleType) -> Any:
        h = nbd.NBD()
        h.add_meta_context("base:allocation")
        if self.bitmap:
            h.add_meta_context(f"qemu:dirty-bitmap:{self.bitmap}")
        h.set_export_name(self.name)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(self.socket_path)  # a leading NUL: an abstract socket, which libnbd cannot name
            h.connect_socket(s.detach())
        except (OSError, nbd.Error) as e:
            s.close()
            where = self.socket_path.replace("\0", "@")
            raise ImageError(f"{where}: cannot connect to NBD export {self.name}: {e}") from e
        return h

    def close(self) -> None:
        pass  # its server stops it


class NbdImage(Image):
    """An image in a QEMU format, as the guest sees it, through its own ``Export``.

    Args:
        info: what ``formats.inspect`` found (format, virtual size, chain).
        write: a writable export.
        bitmap: a persistent dirty bitmap of the image to export too (``dirty_in``).
        holder: who of a running QEMU holds the file (probed before our export took locks).
        force: with ``write``: ignore a running QEMU's locks.
        served: read a point-in-time export a running QEMU serves instead of exporting the file
            (``info.path`` is still the file: identity, as for any image). Read-only.
    """

    def __init__(
        self,
        info: ImageInfo,
        *,
        write: bool = False,
        holder: str | None = None,
        force: bool = False,
        bitmap: str | None = None,
        served: ServedExport | None = None,
    ):
        super().__init__(info.path)  # the file itself, read-only: identity, mtime, flock
        self.write = write
        self.info = info
        self.format = info.format
        self.cluster_size = info.cluster_size
        self.request_size = READ_REQUEST  # each read is a round trip to the export: fewer, larger ones
        self._holder = holder
        self._force = force
        self.bitmap = served.bitmap if served is not None else bitmap
        self._served = served
        self._nbd = nbd_module()
        self._export: Export | ServedExport | None = None
        self._handles: list[Any] = []
        self._local = threading.local()
        self._lock = threading.Lock()
        try:
            self._start()
        except BaseException:
            super().close()
            raise

    def _start(self) -> None:
        self._export = self._served or Export(
            self.info,
            write=self.write,
            force_share=not self.write and self._holder is not None,
            ignore_locks=self.write and self._force,
            bitmap=self.bitmap,
        )
        self._local = threading.local()
        self.size = self._handle().get_size()

    def _stop(self) -> None:
        with self._lock:
            handles, self._handles = self._handles, []
        for h in handles:  # shut down; libnbd frees the handle with its last reference
            with contextlib.suppress(self._nbd.Error):
                h.shutdown()
        handles.clear()
        if self._export is not None:
            self._export.close()
            self._export = None

    def _handle(self) -> Any:
        h = getattr(self._local, "h", None)
        if h is None:
            assert self._export is not None, "closed"
            h = self._local.h = self._export.connect(self._nbd)
            with self._lock:
                self._handles.append(h)
        return h

    def _error(self, what: str, offset: int, e: Exception) -> ImageError:
        return ImageError(f"{self.path}: {what} at offset {offset}: {e}")

    # -- what sync asks of an image --------------------------------------
    def qemu_lock(self) -> str | None:
        return self._holder  # probed before our own export locked the file

    def refresh_size(self) -> int:
        self.stat = os.fstat(self.fd)
        return self.size

    def data_in(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Extents of [offset, offset+length) that hold data: neither holes nor known zeros."""
        return self._extents("base:allocation", offset, length, lambda f: not f & (_STATE_HOLE | _STATE_ZERO))

    def dirty_in(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Extents of [offset, offset+length) that the exported dirty bitmap marks as written."""
        assert self.bitmap, "exported without a bitmap"
        return self._extents(f"qemu:dirty-bitmap:{self.bitmap}", offset, length, lambda f: bool(f & 1))

    def _extents(
        self, context: str, offset: int, length: int, wanted: Callable[[int], bool]
    ) -> list[tuple[int, int]]:
        """The extents of one block-status context in [offset, offset+length) whose flags are ``wanted``.

        Each context of a reply is followed on its own (they may end at different offsets).
        """
        end = min(offset + length, self.size)
        out: list[tuple[int, int]] = []
        pos = offset
        h = self._handle()
        got: list[tuple[int, int, int]] = []

        def extents(meta: str, start: int, entries: list[int], err: Any) -> int:
            if meta == context:
                at = start
                for i in range(0, len(entries) - 1, 2):
                    got.append((at, entries[i], entries[i + 1]))
                    at += entries[i]
            return 0

        while pos < end:
            got.clear()
            try:
                h.block_status(min(end - pos, STATUS_SPAN), pos, extents)
            except self._nbd.Error as e:
                raise self._error("block status", pos, e) from e
            if not got:
                raise ImageError(f"{self.path}: block status at offset {pos} answered nothing")
            for start, n, flags in got:
                n = min(n, end - start)
                if n <= 0:
                    continue
                if wanted(flags):
                    if out and out[-1][0] + out[-1][1] == start:
                        out[-1] = (out[-1][0], out[-1][1] + n)
                    else:
                        out.append((start, n))
            pos = max(pos, got[-1][0] + got[-1][1])
        return out

    def next_data(self, offset: int) -> int:
        """The first offset at or after ``offset`` holding data: one extent asked at a time (REQ_ONE)."""
        pos = offset
        h = self._handle()
        found: list[tuple[int, int]] = []

        def first(meta: str, start: int, entries: list[int], err: Any) -> int:
            if meta == "base:allocation" and len(entries) >= 2:
                found.append((entries[0], entries[1]))
            return 0

        while pos < self.size:
            found.clear()
            try:
                h.block_status(min(self.size - pos, STATUS_SPAN), pos, first, self._nbd.CMD_FLAG_REQ_ONE)
            except self._nbd.Error as e:
                raise self._error("block status", pos, e) from e
            if not found or found[0][0] <= 0:
                raise ImageError(f"{self.path}: block status at offset {pos} answered nothing")
            n, flags = found[0]
            if not flags & (_STATE_HOLE | _STATE_ZERO):
                return pos
            pos += n
        return self.size

    def data_extents(self) -> list[tuple[int, int]]:
        return self.data_in(0, self.size)

    def read_into(self, buf: memoryview, offset: int, *, probe: bool = True) -> tuple[int, int]:
        """Fill ``buf`` from ``offset`` (past the end: zeros). The page cache is qemu's: nothing to give back.

        The reply lands in ``buf`` itself (a shared libnbd buffer, no copy), in requests of at most
        ``READ_REQUEST`` bytes all in flight at once.
        """
        want = len(buf)
        inside = max(0, min(want, self.size - offset))
        h = self._handle()
        pending = []
        try:
            for done in range(0, inside, READ_REQUEST):
                n = min(READ_REQUEST, inside - done)
                shared = self._nbd.Buffer.from_buffer(buf[done : done + n])
                pending.append((h.aio_pread(shared, offset + done), shared))
            for cookie, _ in pending:
                while not h.aio_command_completed(cookie):
                    h.poll(-1)
        except self._nbd.Error as e:
            raise self._error("read error", offset, e) from e
        if inside < want:
            buf[inside:] = bytes(want - inside)
        return inside, want

    @property
    def chain(self) -> list[dict[str, str]]:
        return self.info.chain_json()

    def no_readahead(self) -> None:
        pass

    def residency(self, offset: int, length: int) -> bool:
        return True  # guest offsets are not the file's: treated as cached, so never given back by offset

    def prefetch(self, offset: int, length: int) -> None:
        pass  # qemu reads ahead for its own requests

    def drop_cache(self, offset: int, length: int) -> None:
        """Only the whole file can be given back (guest offsets are not file offsets): ``(0, 0)``."""
        if offset == 0 and length == 0:
            super().drop_cache(0, 0)

    def pwrite_all(self, data: Buffer, offset: int) -> int:
        view = memoryview(data).cast("B")
        h = self._handle()
        for i in range(0, len(view), MAX_REQUEST):
            try:
                h.pwrite(view[i : i + MAX_REQUEST], offset + i)
            except self._nbd.Error as e:
                raise self._error("write error", offset + i, e) from e
        return len(view)

    def zero_range(self, offset: int, length: int) -> int:
        """NBD zero requests that may deallocate (punched in the qcow2). Returns 0: no data written."""
        h = self._handle()
        for i in range(0, length, STATUS_SPAN):
            try:
                h.zero(min(STATUS_SPAN, length - i), offset + i)
            except self._nbd.Error as e:
                raise self._error("writing zeros", offset + i, e) from e
        return 0

    def truncate(self, size: int) -> None:
        """Change the virtual size: the export is stopped, the image resized by qemu-img, exported again."""
        if size == self.size:
            return
        self.fsync()
        self._stop()
        resize(self.path, self.format, size)
        self._start()

    def fsync(self) -> None:
        try:
            self._handle().flush()
        except self._nbd.Error as e:
            raise ImageError(f"{self.path}: flushing to disk: {e}") from e

    def start_writeback(self) -> None:
        pass

    def close(self) -> None:
        self._stop()
        super().close()
