"""Replicate an image by writing only the blocks that changed, crash-safely.

``sync(src, dst)``: compare both images block by block (reading each once, skipping
holes), journal the changed blocks, commit, then write them in place (see
``journal``). ``recover(dst)`` finishes an update a crash interrupted;
``rollback(dst, undo)`` returns a replica to the generation before a sync.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vimgtools.blocks import checksum64, zero_blocks
from vimgtools.errors import ImageError, ImageRefused, Interrupted, InvalidInput, JournalError
from vimgtools.image import Image, fsync_dir
from vimgtools.sync.journal import (
    DATA,
    FLAG_SHRINK,
    JOURNAL_MAGIC,
    UNDO_MAGIC,
    Header,
    JournalContents,
    JournalWriter,
    iter_records,
    journal_path_for,
    read_journal,
    recover_image,
    remove_journal,
    replay,
)
from vimgtools.sync.scan import CHUNK_SIZE, scan

__all__ = ["SyncResult", "recover", "rollback", "sync"]

log = logging.getLogger("vimgtools.sync")

Progress = Callable[[int, int], None]
NEW_SUFFIX = ".vimg-new"


@dataclass
class SyncResult:
    """What a sync did. ``to_dict()`` is the ``--json`` summary."""

    src: str
    dst: str
    block_size: int
    size: int = 0
    blocks: int = 0
    changed: int = 0  # blocks whose content differed
    zero: int = 0  # of those, blocks now all zero: punched (files) or zeroed (devices)
    bytes_read: int = 0  # from both images
    bytes_written: int = 0  # into dst itself (punched holes count 0)
    journal_bytes: int = 0  # written to the redo journal
    undo_bytes: int = 0  # written to the undo file
    seconds: float = 0.0
    dry_run: bool = False
    created: bool = False  # dst did not exist
    resized_from: int | None = None  # dst's old size when it was resized
    resumed_from: int = 0  # an interrupted run's scan position this run started at
    recovered: bool = False  # a committed journal from an interrupted run was replayed first
    dst_extra_bytes: int = 0  # a block device dst larger than src: this tail was left alone
    verified: bool | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["seconds"] = round(self.seconds, 3)
        return d


def _check_block_size(block_size: int) -> None:
    try:
        zero_blocks(b"", block_size)
    except (ValueError, TypeError) as e:
        raise InvalidInput(f"--block-size: {e}") from None


def sync(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    block_size: int = 4096,
    dry_run: bool = False,
    verify: bool = False,
    undo: str | os.PathLike[str] | None = None,
    allow_shrink: bool = False,
    force: bool = False,
    journal: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    workers: int = 2,
    keep_cache: bool = False,
) -> SyncResult:
    """Make ``dst`` a byte-identical copy of ``src``, writing only what differs.

    Args:
        src: image file or block device to copy from (only read).
        dst: replica: file (created sparse if missing, resized to ``src``) or block device.
        block_size: comparison unit in bytes (power of two, 4 KiB to 16 MiB).
        dry_run: read and report; write nothing.
        verify: re-read ``dst`` afterwards and compare with ``src``.
        undo: keep the old content of every overwritten block in this file (see ``rollback``).
        allow_shrink: let a larger ``dst`` file be cut to ``src``'s size.
        force: write a ``dst`` that a running QEMU holds open.
        journal: redo journal path (default: ``DST.vimg-journal``; for devices under /var/lib/vimgtools).
        progress: called with (bytes done, bytes total) after each chunk.
        stop: when set, stop at the next chunk boundary (resumable) and raise ``Interrupted``.
        workers: reader threads.
        keep_cache: keep the pages this run brought into the page cache.

    Returns:
        A ``SyncResult`` with the figures.

    Raises:
        InvalidInput, ImageRefused: refused before any write (exit 2).
        ImageError, JournalError: failed; ``dst`` as it was, or completed by ``recover``.
        Interrupted: stopped by ``stop``; run again to resume.
    """
    t0 = time.monotonic()
    _check_block_size(block_size)
    src_path, dst_path = Path(src), Path(dst)
    res = SyncResult(str(src_path), str(dst_path), block_size, dry_run=dry_run)
    with Image(src_path) as s:
        res.size = s.size
        res.blocks = -(-s.size // block_size)
        if s.qemu_lock() == "writer":
            msg = (
                f"{src_path}: a running VM has it open for writing; the copy is only crash-consistent "
                "(snapshot the VM first, see docs/sync.md)"
            )
            log.warning("warning: %s", msg)
            res.warnings.append(msg)
        if not dst_path.exists() and not dst_path.is_symlink():
            _sync_new(s, dst_path, res, progress, stop, workers, keep_cache)
        else:
            with Image(dst_path, write=not dry_run) as d:
                _refuse(s, d, res, allow_shrink, force)
                if not dry_run:
                    d.lock_exclusive("sync")
                _sync_existing(s, d, res, journal, undo, progress, stop, workers, keep_cache)
        if verify and not dry_run:
            res.verified = _verify(s, dst_path, block_size, workers)
            if not res.verified:
                raise ImageError(f"{dst_path}: verification failed: it differs from {src_path}")
    res.seconds = time.monotonic() - t0
    return res


def _refuse(s: Image, d: Image, res: SyncResult, allow_shrink: bool, force: bool) -> None:
    """Every reason to refuse before writing anything (exit 2)."""
    if s.same_as(d):
        raise ImageRefused(f"{d.path}: is the same file as {s.path}")
    holder = d.qemu_lock()
    if holder and not force:
        raise ImageRefused(
            f"{d.path}: a running VM (QEMU) holds this image open as {holder}; "
            "stop it first, or use --force to write it anyway"
        )
    if d.is_block:
        if d.size < s.size:
            raise ImageRefused(f"{d.path}: device is {d.size} bytes, smaller than {s.path} ({s.size} bytes)")
        res.dst_extra_bytes = d.size - s.size
    elif d.size > s.size and not allow_shrink:
        raise ImageRefused(
            f"{d.path}: is {d.size} bytes, larger than {s.path} ({s.size} bytes); "
            "use --allow-shrink to cut it to the source's size"
        )


def _runs_bytes(chunk_offset: int, chunk_length: int, b0: int, b1: int, bs: int) -> tuple[int, int]:
    start = b0 * bs
    return chunk_offset + start, min(b1 * bs, chunk_length) - start


def _sync_new(
    s: Image,
    dst_path: Path,
    res: SyncResult,
    progress: Progress | None,
    stop: threading.Event | None,
    workers: int,
    keep_cache: bool,
) -> None:
    """A missing replica: build it under a temporary name, then rename (atomic, resumable)."""
    res.created = True
    if not dst_path.parent.is_dir():
        raise InvalidInput(f"{dst_path}: directory {dst_path.parent} does not exist")
    bs = res.block_size
    if res.dry_run:
        for chunk in scan(s, None, start=0, end=s.size, block_size=bs, dst_size=0, workers=workers):
            _count(chunk.runs, chunk.offset, chunk.length, bs, res)
            res.bytes_read += chunk.bytes_read
            chunk.release()
        return
    tmp = dst_path.with_name(dst_path.name + NEW_SUFFIX)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, s.stat.st_mode & 0o777)
        os.close(fd)
    except OSError as e:
        raise ImageError(f"{dst_path}: cannot create: {e.strerror}") from e
    with Image(tmp, write=True) as d:
        d.lock_exclusive("sync")
        old = d.size
        if old:
            res.resumed_from = -1  # an earlier interrupted copy: compared, not copied again
        d.truncate(s.size)
        for chunk in scan(
            s,
            d,
            start=0,
            end=s.size,
            block_size=bs,
            dst_size=old,
            workers=workers,
            keep_cache=keep_cache,
            stop=stop,
        ):
            try:
                for b0, b1, zero in chunk.runs:
                    off, n = _runs_bytes(chunk.offset, chunk.length, b0, b1, bs)
                    if zero:
                        res.bytes_written += d.zero_range(off, n)
                    else:
                        rel = off - chunk.offset
                        res.bytes_written += d.pwrite_all(chunk.src[rel : rel + n], off)
                _count(chunk.runs, chunk.offset, chunk.length, bs, res)
                res.bytes_read += chunk.bytes_read
            finally:
                chunk.release()
            if progress:
                progress(chunk.offset + chunk.length, s.size)
            if stop is not None and stop.is_set() and chunk.offset + chunk.length < s.size:
                raise Interrupted(
                    f"{dst_path}: not created yet (partial copy kept in {tmp}); "
                    "run the same command again to resume"
                )
        d.fsync()
    os.replace(tmp, dst_path)
    fsync_dir(dst_path.parent)


def _count(runs: list[tuple[int, int, bool]], offset: int, length: int, bs: int, res: SyncResult) -> None:
    for b0, b1, zero in runs:
        res.changed += b1 - b0
        if zero:
            res.zero += b1 - b0


def _sync_existing(
    s: Image,
    d: Image,
    res: SyncResult,
    journal: str | os.PathLike[str] | None,
    undo: str | os.PathLike[str] | None,
    progress: Progress | None,
    stop: threading.Event | None,
    workers: int,
    keep_cache: bool,
) -> None:
    bs = res.block_size
    jpath = Path(journal) if journal is not None else journal_path_for(d)
    new_size = d.size if d.is_block else s.size
    header = Header(
        JOURNAL_MAGIC,
        bs,
        d.size,
        new_size,
        FLAG_SHRINK if new_size < d.size else 0,
        s.size,
        (*s.identity, s.stat.st_mtime_ns),
        (*d.identity, d.stat.st_mtime_ns),
    )
    writer: JournalWriter | None = None
    start = 0
    if not res.dry_run:
        if recover_image(d, jpath) is not None:
            log.info("%s: completed the update an interrupted run had committed", d.path)
            res.recovered = True
            d.refresh_size()
            header = _with_dst(header, d)
        writer, start = _open_journal(jpath, header)
        res.resumed_from = start
    if new_size != d.size:
        res.resized_from = d.size
    try:
        end = s.size
        for chunk in scan(
            s,
            d,
            start=start,
            end=end,
            block_size=bs,
            dst_size=d.size,
            workers=workers,
            keep_cache=keep_cache,
            stop=stop,
        ):
            try:
                if writer is not None:
                    for b0, b1, zero in chunk.runs:
                        off, n = _runs_bytes(chunk.offset, chunk.length, b0, b1, bs)
                        if zero:
                            writer.zero(off, n)
                        else:
                            rel = off - chunk.offset
                            writer.data(off, chunk.src[rel : rel + n])
                    writer.checkpoint(chunk.offset + chunk.length)
                _count(chunk.runs, chunk.offset, chunk.length, bs, res)
                res.bytes_read += chunk.bytes_read
            finally:
                chunk.release()
            if progress:
                progress(chunk.offset + chunk.length, end)
            if stop is not None and stop.is_set() and chunk.offset + chunk.length < end:
                raise Interrupted(
                    f"{d.path}: unchanged; stopped at {chunk.offset + chunk.length} of {end} bytes; "
                    "run the same command again to resume"
                )
        if writer is None:
            return
        res.journal_bytes = writer.data_bytes
        if not d.still_at_path():
            raise ImageError(f"{d.path}: vanished or was replaced during the sync; nothing written")
        if undo is not None:
            res.undo_bytes = _write_undo(Path(undo), d, read_journal(jpath), header)
        writer.commit()
        writer.close()
        res.bytes_written = replay(d, jpath, read_journal(jpath))
    except BaseException as e:
        if writer is not None:
            writer.close()
            if not writer.committed and not isinstance(e, (Interrupted, KeyboardInterrupt)):
                remove_journal(jpath)  # dst untouched; do not leave a big file on a full disk
        raise


def _with_dst(header: Header, d: Image) -> Header:
    return Header(
        header.magic,
        header.block_size,
        d.size,
        header.new_size,
        FLAG_SHRINK if header.new_size < d.size else 0,
        header.src_size,
        header.src_id,
        (*d.identity, d.stat.st_mtime_ns),
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


def _write_undo(path: Path, d: Image, journal: JournalContents, header: Header) -> int:
    """Keep the old content of everything the journal will overwrite (durable before any write)."""
    uheader = Header(UNDO_MAGIC, header.block_size, d.size, header.new_size, 0, dst_id=header.dst_id)
    undo = JournalWriter(path, uheader)
    try:
        buf = bytearray(CHUNK_SIZE)
        for rec, payload in iter_records(journal):
            new_sum = checksum64(payload if payload is not None else bytes(rec.length))
            view = memoryview(buf)[: rec.length]
            d.read_into(view, rec.offset)
            if not zero_blocks(view, 1 << 24).all():
                undo.data(rec.offset, view, aux=new_sum)
            else:
                undo.zero(rec.offset, rec.length, aux=new_sum)
        undo.commit()
        return undo.data_bytes
    finally:
        undo.close()


def recover(dst: str | os.PathLike[str], *, journal: str | os.PathLike[str] | None = None) -> int | None:
    """Complete the update an interrupted sync committed. None when there was nothing to complete.

    A journal whose scan was interrupted before commit is left alone: ``dst`` is untouched by it,
    and running the same sync again resumes it.
    """
    with Image(dst, write=True) as d:
        d.lock_exclusive("recovery")
        jpath = Path(journal) if journal is not None else journal_path_for(d)
        return recover_image(d, jpath)


def rollback(dst: str | os.PathLike[str], undo: str | os.PathLike[str]) -> int:
    """Return ``dst`` to the generation before the sync that wrote ``undo``. Returns bytes written.

    Refuses (ImageRefused) when ``dst`` no longer holds what that sync wrote.
    """
    upath = Path(undo)
    contents = read_journal(upath, UNDO_MAGIC)
    if not contents.committed:
        raise JournalError(f"{upath}: incomplete undo file (its sync never reached the point of writing)")
    h = contents.header
    with Image(dst, write=True) as d:
        d.lock_exclusive("rollback")
        jpath = journal_path_for(d)
        recover_image(d, jpath)
        d.refresh_size()
        if d.size != h.new_size and not d.is_block:
            raise ImageRefused(f"{d.path}: is {d.size} bytes, the undo file is for {h.new_size} bytes")
        buf = bytearray(CHUNK_SIZE)
        for rec, _ in iter_records(contents):
            view = memoryview(buf)[: rec.length]
            d.read_into(view, rec.offset)
            if checksum64(view) != rec.aux:
                raise ImageRefused(
                    f"{d.path}: changed since the sync that wrote {upath} "
                    f"(offset {rec.offset}); not rolled back"
                )
        flags = FLAG_SHRINK if h.old_size < d.size else 0
        writer = JournalWriter(jpath, Header(JOURNAL_MAGIC, h.block_size, d.size, h.old_size, flags))
        try:
            for rec, payload in iter_records(contents):
                if rec.kind == DATA and payload is not None:
                    writer.data(rec.offset, payload)
                else:
                    writer.zero(rec.offset, rec.length)
            writer.commit()
        except BaseException:
            writer.close()
            remove_journal(jpath)
            raise
        writer.close()
        return replay(d, jpath, read_journal(jpath))


def _verify(s: Image, dst_path: Path, block_size: int, workers: int) -> bool:
    with Image(dst_path) as d:
        if not d.is_block and d.size != s.size:
            return False
        d.drop_cache(0, 0)  # read back what reached the disk, not our own cached writes
        for chunk in scan(s, d, start=0, end=s.size, block_size=block_size, dst_size=d.size, workers=workers):
            differs = bool(chunk.runs)
            chunk.release()
            if differs:
                return False
    return True
