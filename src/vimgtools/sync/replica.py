"""The receiving end of a sync, local or remote: refusals, the journal, resume, undo, apply.

A ``Replica`` takes changed ranges (``data``/``zero``, a ``end_chunk`` after each
chunk) and makes them reach the image crash-safely: through the redo journal for
an existing image, or into ``DST.vimg-new`` renamed at the end for a new one.

Every writer (local sync, the receiving end of a push or pull, apply-delta) goes
through ``Replica.receiving()``, the one place for the end of a run: success makes
the update durable (``finish``); a failure leaves the image untouched and removes the
journal, unless the run was interrupted (``RESUMABLE``: a signal, or the far side
gone) after a resume point, when the next run of the same command resumes it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from vimgtools.errors import ImageError, ImageRefused, Interrupted, InvalidInput, JournalError, TransportError
from vimgtools.formats import check_format_name, create, format_by_name
from vimgtools.image import Image, fsync_dir
from vimgtools.images import open_image, refuse_if_held
from vimgtools.journal import (
    FLAG_SHRINK,
    JOURNAL_MAGIC,
    Header,
    JournalWriter,
    committed_journal,
    journal_path_for,
    read_journal,
    recover_image,
    remove_journal,
    replay,
)
from vimgtools.sync.chunks import CHUNK_SIZE
from vimgtools.sync.options import SyncOptions
from vimgtools.sync.undo import UndoWriter, write_undo

if TYPE_CHECKING:
    from typing_extensions import Buffer

log = logging.getLogger("vimgtools.sync")

NEW_SUFFIX = ".vimg-new"
# A run stopped by these keeps its journal for the next run to resume (past its last checkpoint).
RESUMABLE = (Interrupted, KeyboardInterrupt, TransportError)
# What a replica reports of a run (SyncResult.take_replica; the far side's RESULT).
REPLICA_FIGURES = (
    "created", "resized_from", "resumed_from", "recovered", "dst_extra_bytes",
    "bytes_written", "journal_bytes", "undo_bytes", "seconds_flush", "dst_format",
)  # fmt: skip
RESIZABLE = ("raw", "qcow2", "qed")  # formats whose virtual size qemu-img resize changes


class Source(NamedTuple):
    """What the replica needs to know of the source (which may be on another host)."""

    size: int  # the guest's view: a qcow2's virtual size
    identity: tuple[int, int, int] = (0, 0, 0)  # dev, ino, mtime_ns: an interrupted run resumes only for it
    token: str = ""  # boot id + device + inode: refuses syncing a file onto itself, across ssh too
    mode: int = 0o600
    cluster_size: int = 0  # a qcow2 source's: a qcow2 replica is created with it


class Expect(NamedTuple):
    """What a replica looked like right after a sync: if it still does, nobody changed it since."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    token: str

    @classmethod
    def of(cls, img: Image) -> Expect:
        img.refresh_size()
        st = img.stat
        size = img.size if img.is_block else st.st_size  # the file's (a qcow2's is not its virtual size)
        return cls(img.identity[0], img.identity[1], size, st.st_mtime_ns, identity_token(img))

    def to_json(self) -> dict[str, object]:
        return {
            "dev": self.dev,
            "ino": self.ino,
            "size": self.size,
            "mtime_ns": self.mtime_ns,
            "token": self.token,
        }

    @classmethod
    def from_json(cls, obj: object) -> Expect | None:
        try:
            assert isinstance(obj, dict)
            return cls(
                int(obj["dev"]), int(obj["ino"]), int(obj["size"]), int(obj["mtime_ns"]), str(obj["token"])
            )
        except (AssertionError, KeyError, TypeError, ValueError):
            return None


NO_EXPECT = Expect(0, 0, 0, 0, "")


class Replica:
    """Open (or prepare to create) ``path`` to receive a copy of ``source``.

    Every refusal happens here, before anything is written (ImageRefused / InvalidInput, exit 2).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        source: Source,
        *,
        block_size: int,
        dry_run: bool = False,
        allow_shrink: bool = False,
        force: bool = False,
        journal: str | os.PathLike[str] | None = None,
        fmt: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.source = source
        self.fmt = fmt  # the replica's format: given, or by the rule in vimgtools.formats
        self.block_size = block_size
        self.dry_run = dry_run
        self.created = False
        self.resized_from: int | None = None
        self.resume_from = 0
        self.recovered = False
        self.dst_extra_bytes = 0
        self.bytes_written = 0
        self.journal_bytes = 0
        self.undo_bytes = 0
        self.seconds_flush = 0.0  # commit, apply in place and fsync: what durability costs
        self.image: Image | None = None
        self.opened: Expect | None = None  # the replica as found, before anything (recovery included)
        self._writer: JournalWriter | None = None
        self._undo: UndoWriter | None = None  # kept as the changes come, from the old content given
        self._checkpointed = False  # a resume point was written (this run, or the run resumed)
        self._tmp: Path | None = None
        self.jpath: Path | None = None
        if not self.path.exists() and not self.path.is_symlink():
            self._prepare_new()
        else:
            self._prepare_existing(allow_shrink, force, journal)

    @property
    def format(self) -> str:
        return (
            self.image.format if self.image is not None else (self.fmt or format_by_name(self.path) or "raw")
        )

    @classmethod
    def for_sync(cls, path: str | os.PathLike[str], source: Source, opts: SyncOptions) -> Replica:
        """The replica a sync with ``opts`` writes (local, pull, or the far side of a push)."""
        return cls(
            path, source, block_size=opts.block_size, dry_run=opts.dry_run, allow_shrink=opts.allow_shrink,
            force=opts.force, journal=opts.journal, fmt=opts.dst_format,
        )  # fmt: skip

    @property
    def dst_size(self) -> int:
        """Size of what the source is compared with (beyond it, the replica reads as zeros)."""
        return self._compare_size

    # -- preparation ----------------------------------------------------
    def _prepare_new(self) -> None:
        self.created = True
        self._compare_size = 0
        if not self.path.parent.is_dir():
            raise InvalidInput(f"{self.path}: directory {self.path.parent} does not exist")
        fmt = self.fmt or format_by_name(self.path) or "raw"
        if fmt != "raw":
            check_format_name(fmt, "dst_format")
        if self.dry_run:
            return
        self._tmp = self.path.with_name(self.path.name + NEW_SUFFIX)
        if fmt != "raw":
            self.image = self._new_formatted(self._tmp, fmt)
            return
        try:
            os.close(os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, self.source.mode & 0o777))
        except OSError as e:
            raise ImageError(f"{self.path}: cannot create: {e.strerror}") from e
        img = self.image = Image(self._tmp, write=True)
        img.lock_exclusive("sync")
        self._compare_size = img.size  # an earlier interrupted copy is compared, not copied again
        img.truncate(self.source.size)

    def _new_formatted(self, tmp: Path, fmt: str) -> Image:
        """A new image in ``fmt`` (the source's virtual size and cluster size), or the one a run left."""
        img = None
        resumed = False
        if tmp.exists():  # an earlier interrupted copy is compared, not copied again
            try:
                img = open_image(tmp, fmt=fmt, write=True, option="dst_format")
            except (ImageError, InvalidInput) as e:
                log.info("%s: %s; starting it over", tmp, e)
            else:
                resumed = img.size == self.source.size
                if not resumed:
                    img.close()
                    img = None
        if img is None:
            tmp.unlink(missing_ok=True)
            create(tmp, fmt, self.source.size, self.source.cluster_size)
            os.chmod(tmp, self.source.mode & 0o777)
            img = open_image(tmp, fmt=fmt, write=True, option="dst_format")
        try:
            img.lock_exclusive("sync")
        except BaseException:
            img.close()
            raise
        self._compare_size = img.size if resumed else 0  # a fresh image reads as zeros: nothing to compare
        return img

    def _prepare_existing(
        self, allow_shrink: bool, force: bool, journal: str | os.PathLike[str] | None
    ) -> None:
        img = self.image = open_image(
            self.path, fmt=self.fmt, write=not self.dry_run, force=force, option="dst_format"
        )
        try:
            self.opened = Expect.of(img)
            self._refuse(img, allow_shrink, force)
            if self.dry_run:
                self._compare_size = img.size
                return
            img.lock_exclusive("sync")
            self.jpath = Path(journal) if journal is not None else journal_path_for(img)
            if recover_image(img, self.jpath) is not None:
                log.info("%s: completed the update an interrupted run had committed", img.path)
                self.recovered = True
                img.refresh_size()
            self._compare_size = img.size
            new_size = img.size if img.is_block else self.source.size
            if new_size != img.size:
                self.resized_from = img.size
            header = Header(
                JOURNAL_MAGIC,
                self.block_size,
                img.size,
                new_size,
                FLAG_SHRINK if new_size < img.size else 0,
                self.source.size,
                self.source.identity,
                (*img.identity, img.stat.st_mtime_ns),
            )
            self._writer, self.resume_from = _open_journal(self.jpath, header)
            self._checkpointed = self.resume_from > 0
        except BaseException:
            img.close()
            raise

    def _refuse(self, d: Image, allow_shrink: bool, force: bool) -> None:
        if self.source.token and self.source.token == identity_token(d):
            raise ImageRefused(f"{d.path}: is the same file as the source")
        refuse_if_held(d.path, d.qemu_lock(), force)
        size = self.source.size
        if d.is_block:
            if d.size < size:
                raise ImageRefused(
                    f"{d.path}: device is {d.size} bytes, smaller than the source ({size} bytes)"
                )
            self.dst_extra_bytes = d.size - size
        elif d.size > size and not allow_shrink:
            raise ImageRefused(
                f"{d.path}: is {d.size} bytes, larger than the source ({size} bytes); "
                "use --allow-shrink to cut it to the source's size"
            )
        elif d.size != size and d.format not in RESIZABLE:
            raise ImageRefused(
                f"{d.path}: a {d.format} image of {d.size} bytes; the source has {size}, and vimgtools "
                f"resizes only {', '.join(RESIZABLE)} replicas"
            )

    # -- receiving changes ----------------------------------------------
    @property
    def wants_old(self) -> bool:
        """Whether each change must bring the replica's old content (the undo file is kept from it)."""
        return self._undo is not None

    def data(self, offset: int, payload: Buffer, old: Buffer | None = None) -> None:
        """``old``: the replica's bytes there now, when ``receiving(with_old=True)`` was promised."""
        if self._writer is not None:
            self._writer.data(offset, payload)
            if self._undo is not None:
                assert old is not None, "receiving(with_old=True): every change brings the old content"
                self._undo.add(offset, old, payload)
        elif self._tmp is not None and self.image is not None:
            self.bytes_written += self.image.pwrite_all(payload, offset)

    def zero(self, offset: int, length: int, old: Buffer | None = None) -> None:
        if self._writer is not None:
            self._writer.zero(offset, length)
            if self._undo is not None:
                assert old is not None, "receiving(with_old=True): every change brings the old content"
                self._undo.add(offset, old, None)
        elif self._tmp is not None and self.image is not None:
            self.bytes_written += self.image.zero_range(offset, length)

    def end_chunk(self, position: int) -> None:
        """Everything before ``position`` has been received: a resume point."""
        if self._writer is not None:
            self._writer.checkpoint(position)
            self._checkpointed = True

    # -- the end --------------------------------------------------------
    def finish(self, undo: str | os.PathLike[str] | None = None) -> None:
        """Make the update durable and visible: commit and apply the journal, or rename the new file."""
        if self.dry_run or self.image is None:
            return
        t0 = time.monotonic()
        try:
            self._finish(undo)
        finally:
            self.seconds_flush = time.monotonic() - t0

    def _finish(self, undo: str | os.PathLike[str] | None) -> None:
        img = self.image
        assert img is not None
        if self._tmp is not None:
            img.fsync()  # an NBD flush for a formatted image: durable before it gets its name
            os.replace(self._tmp, self.path)
            fsync_dir(self.path.parent)
            return
        writer, jpath = self._writer, self.jpath
        assert writer is not None and jpath is not None
        self.journal_bytes = writer.data_bytes
        if not img.still_at_path():
            raise ImageError(f"{img.path}: vanished or was replaced during the sync; nothing written")
        if self._undo is not None:
            self.undo_bytes = self._undo.commit()
        elif undo is not None:  # the old content was not given as it came: read it now
            self.undo_bytes = write_undo(Path(undo), img, read_journal(jpath), writer.header)
        writer.commit()
        writer.close()
        self.bytes_written = replay(img, jpath, read_journal(jpath, mapped=True))  # locked since open

    def expect_after(self) -> Expect | None:
        """The replica as this run leaves it (for a state file), None after a dry run."""
        if self.dry_run:
            return None
        with Image(self.path) as img:  # the file itself: its identity, size and mtime
            return Expect.of(img)

    def trusts(self, expect: Expect | None) -> bool:
        """Whether the replica is exactly as a state file says the last sync left it."""
        ok = expect is not None and self.opened == expect and not self.recovered and expect.token != ""
        if ok and self.image is not None and self.image.is_block:
            log.warning(
                "warning: %s is a block device: changes made to it outside vimgtools cannot be detected; "
                "--state trusts that nothing else wrote it",
                self.path,
            )
        return ok

    def abort(self, *, keep_for_resume: bool) -> None:
        """Give up before the commit: the image is untouched. Keep the journal only to resume."""
        writer = self._writer
        if writer is not None:
            writer.close()
            if not writer.committed and not keep_for_resume and self.jpath is not None:
                remove_journal(self.jpath)  # do not leave a big file on a full disk

    @contextlib.contextmanager
    def receiving(
        self, undo: str | os.PathLike[str] | None = None, *, with_old: bool = False
    ) -> Iterator[Replica]:
        """Take changes inside this block; it ends with ``finish(undo)``, or ``abort`` on a failure.

        The journal is kept for a resume only when a ``RESUMABLE`` failure came after a resume point.
        ``with_old``: every ``data``/``zero`` brings the replica's old content of its range (a compare
        read it anyway), and the undo file is written from it as the changes come, instead of
        reading the replica again at the end (cold, those reads were most of an incremental run).
        """
        img, writer = self.image, self._writer
        if undo is not None and with_old and writer is not None and img is not None and not self.resume_from:
            self._undo = UndoWriter(Path(undo), img.size, writer.header)  # a resumed run's began before
        try:
            yield self
            self.finish(undo)
        except BaseException as e:
            self.abort(keep_for_resume=isinstance(e, RESUMABLE) and self._checkpointed)
            raise
        finally:
            if self._undo is not None:
                self._undo.close()
                self._undo = None

    def figures(self) -> dict[str, object]:
        """What this run did to the replica, by the names of ``REPLICA_FIGURES``."""
        return {
            "created": self.created, "resized_from": self.resized_from, "resumed_from": self.resume_from,
            "recovered": self.recovered, "dst_extra_bytes": self.dst_extra_bytes,
            "bytes_written": self.bytes_written, "journal_bytes": self.journal_bytes,
            "undo_bytes": self.undo_bytes, "seconds_flush": self.seconds_flush, "dst_format": self.format,
        }  # fmt: skip

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self.image is not None:
            self.image.close()

    def __enter__(self) -> Replica:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def identity_token(img: Image) -> str:
    """Names one file on one running system: boot id, device, inode (or rdev for devices)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = os.uname().nodename
    return f"{boot}:{img.identity[0]}:{img.identity[1]}"


def source_of(img: Image) -> Source:
    return Source(
        img.size,
        (*img.identity, img.stat.st_mtime_ns),
        identity_token(img),
        img.stat.st_mode,
        img.cluster_size,
    )


def _open_journal(jpath: Path, header: Header) -> tuple[JournalWriter, int]:
    """A new journal, or the one an interrupted run left, if it is about the same two images."""
    if jpath.exists():
        try:
            old = read_journal(jpath)
        except JournalError as e:
            log.warning("warning: %s; starting over", e)
        else:
            same = (
                old.header.src_id == header.src_id
                and old.header.dst_id == header.dst_id
                and old.header.block_size == header.block_size
                and old.header.new_size == header.new_size
                and old.header.src_size == header.src_size
                and old.checkpoint % CHUNK_SIZE == 0
            )
            if same and old.checkpoint:
                log.info("resuming an interrupted sync at %d bytes", old.checkpoint)
                writer = JournalWriter(
                    jpath, old.header, resume_at=old.resume_at, seq=old.seq, data_bytes=old.data_bytes
                )
                return writer, old.checkpoint
            log.info("%s: left by a sync of other images or an older source; starting over", jpath)
        remove_journal(jpath)
    return JournalWriter(jpath, header), 0


def recover(
    dst: str | os.PathLike[str],
    *,
    journal: str | os.PathLike[str] | None = None,
    dry_run: bool = False,
    fmt: str | None = None,
) -> int | None:
    """Complete the update an interrupted sync committed. None when there was nothing to complete.

    Returns the bytes written (with ``dry_run``: the bytes of data the journal would write;
    nothing is written). A journal whose scan was interrupted before commit is left alone:
    ``dst`` is untouched by it, and running the same sync again resumes it.
    """
    with open_image(dst, fmt=fmt, write=not dry_run, option="dst_format") as d:
        jpath = Path(journal) if journal is not None else journal_path_for(d)
        if dry_run:
            contents = committed_journal(jpath)
            return None if contents is None else contents.data_bytes
        d.lock_exclusive("recovery")
        return recover_image(d, jpath)
