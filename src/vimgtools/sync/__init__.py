"""Replicate an image by writing only the blocks that changed, crash-safely.

``sync(src, dst)``: compare both images block by block (reading each once, skipping
holes), journal the changed blocks, commit, then write them in place (see
``journal`` and ``replica``). Either side may be ``[user@]host:path`` (see
``remote``). ``recover(dst)`` finishes an update a crash interrupted;
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

import numpy as np
import numpy.typing as npt

from vimgtools.blocks import Run, checksum64, zero_blocks
from vimgtools.errors import ImageError, ImageRefused, Interrupted, InvalidInput, JournalError
from vimgtools.image import Image
from vimgtools.sync.digests import chunk_digests
from vimgtools.sync.journal import (
    UNDO_MAGIC,
    iter_records,
    journal_path_for,
    read_journal,
    recover_image,
    write_through_journal,
)
from vimgtools.sync.remote import Session, run_sender, split_remote, sync_remote
from vimgtools.sync.replica import Replica, source_of
from vimgtools.sync.scan import CHUNK_SIZE, scan
from vimgtools.sync.state import StateRun

__all__ = ["SyncResult", "recover", "rollback", "sync"]

log = logging.getLogger("vimgtools.sync")

Progress = Callable[[int, int], None]


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
    bytes_read: int = 0  # from the image(s) on this host; with a remote peer, its reads are added
    bytes_written: int = 0  # into dst itself (punched holes count 0)
    journal_bytes: int = 0  # written to the redo journal
    undo_bytes: int = 0  # written to the undo file
    seconds: float = 0.0
    seconds_flush: float = 0.0  # of those, committing, writing in place and fsyncing (the rest is comparing)
    dry_run: bool = False
    created: bool = False  # dst did not exist
    resized_from: int | None = None  # dst's old size when it was resized
    resumed_from: int = 0  # an interrupted run's scan position this run started at
    recovered: bool = False  # a committed journal from an interrupted run was replayed first
    dst_extra_bytes: int = 0  # a block device dst larger than src: this tail was left alone
    verified: bool | None = None
    warnings: list[str] = field(default_factory=list)
    bytes_sent: int | None = None  # remote sync only: bytes this side wrote to / read from the pipe
    bytes_received: int | None = None
    seconds_connect: float | None = None  # remote sync only: starting the far side (ssh) until it answered
    state: str | None = (
        None  # --state: "trusted" (SRC alone was read), "none yet", "replica changed since", ...
    )

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["seconds"] = round(self.seconds, 3)
        d["seconds_flush"] = round(self.seconds_flush, 3)
        if self.bytes_sent is None:
            del d["bytes_sent"], d["bytes_received"], d["seconds_connect"]
        elif self.seconds_connect is not None:
            d["seconds_connect"] = round(self.seconds_connect, 3)
        if self.state is None:
            del d["state"]
        return d

    def count(self, runs: list[Run]) -> None:
        for b0, b1, zero in runs:
            self.changed += b1 - b0
            if zero:
                self.zero += b1 - b0

    def take_replica(self, rep: Replica) -> None:
        self.created = rep.created
        self.resized_from = rep.resized_from
        self.resumed_from = rep.resume_from
        self.recovered = rep.recovered
        self.dst_extra_bytes = rep.dst_extra_bytes
        self.bytes_written = rep.bytes_written
        self.journal_bytes = rep.journal_bytes
        self.undo_bytes = rep.undo_bytes
        self.seconds_flush = rep.seconds_flush


def check_block_size(block_size: int) -> None:
    """A power of two from 4 KiB to 8 MiB: a block never spans two of the 8 MiB chunks we read."""
    try:
        zero_blocks(b"", block_size)
    except (ValueError, TypeError) as e:
        raise InvalidInput(f"--block-size: {e}") from None
    if block_size > CHUNK_SIZE:
        raise InvalidInput(
            f"--block-size: {block_size} is larger than sync's 8 MiB chunks: use a power of two "
            "from 4096 (4 KiB) to 8388608 (8 MiB)"
        )


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
    checksum: str = "xxh128",
    rsh: str = "ssh",
    remote_python: str = "python3",
    timeout: float = 300.0,
    state: str | os.PathLike[str] | None = None,
) -> SyncResult:
    """Make ``dst`` a byte-identical copy of ``src``, writing only what differs.

    Args:
        src: image file or block device to copy from (only read).
        dst: replica: file (created sparse if missing, resized to ``src``) or block device.
        block_size: comparison unit in bytes (power of two, 4 KiB to 8 MiB).
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
        checksum: remote only: block digest, ``"xxh128"`` (seeded per session) or ``"blake2b"`` (keyed).
        rsh: remote only: the command that reaches the host (``ssh`` by default), split like a shell would.
        remote_python: remote only: the Python that runs ``-m vimgtools.sync --server`` there.
        timeout: remote only: seconds of silence from the far side before giving up.
        state: keep SRC's digests in this file; the next run then reads SRC alone (see ``state``).

    Either ``src`` or ``dst`` may be ``[user@]host:path`` (see ``vimgtools.sync.remote``).

    Returns:
        A ``SyncResult`` with the figures.

    Raises:
        InvalidInput, ImageRefused: refused before any write (exit 2).
        ImageError, JournalError: failed; ``dst`` as it was, or completed by ``recover``.
        Interrupted: stopped by ``stop``; run again to resume.
    """
    t0 = time.monotonic()
    check_block_size(block_size)
    if split_remote(str(src))[0] or split_remote(str(dst))[0]:
        res = SyncResult(str(src), str(dst), block_size, dry_run=dry_run)
        options = {
            "dry_run": dry_run,
            "undo": None if undo is None else str(undo),
            "allow_shrink": allow_shrink,
            "force": force,
            "journal": None if journal is None else str(journal),
            "keep_cache": keep_cache,
            "state": None if state is None else str(state),
        }
        sync_remote(
            str(src), str(dst), res, checksum=checksum, rsh=rsh, remote_python=remote_python,
            timeout=timeout, options=options, progress=progress, stop=stop,
        )  # fmt: skip
        res.seconds = time.monotonic() - t0
        return res
    src_path, dst_path = Path(src), Path(dst)
    res = SyncResult(str(src_path), str(dst_path), block_size, dry_run=dry_run)
    with Image(src_path) as s:
        res.size = s.size
        res.blocks = -(-s.size // block_size)
        warn_if_written_by_vm(s, res)
        with Replica(
            dst_path,
            source_of(s),
            block_size=block_size,
            dry_run=dry_run,
            allow_shrink=allow_shrink,
            force=force,
            journal=journal,
        ) as rep:
            st = StateRun(str(state), block_size, checksum, s.size) if state is not None else None
            try:
                if st is None:
                    _compare_into(s, rep, res, progress, stop, workers, keep_cache)
                else:
                    _compare_with_state(s, rep, res, st, progress, stop, keep_cache)
                rep.finish(undo)
                if st is not None:
                    after = rep.expect_after()
                    if after is None:
                        st.writer.abort()
                    else:
                        st.writer.finish(after)
            except BaseException as e:
                if st is not None:
                    st.writer.abort()
                rep.abort(keep_for_resume=isinstance(e, (Interrupted, KeyboardInterrupt)))
                raise
            finally:
                if st is not None:
                    st.close()
            res.take_replica(rep)
        if verify and not dry_run:
            res.verified = _verify(s, dst_path, block_size, workers)
            if not res.verified:
                raise ImageError(f"{dst_path}: verification failed: it differs from {src_path}")
    res.seconds = time.monotonic() - t0
    return res


def warn_if_written_by_vm(s: Image, res: SyncResult) -> None:
    if s.qemu_lock() == "writer":
        msg = (
            f"{s.path}: a running VM has it open for writing; the copy is only crash-consistent "
            "(snapshot the VM first, see docs/sync.md)"
        )
        log.warning("warning: %s", msg)
        res.warnings.append(msg)


def run_bytes(chunk_offset: int, chunk_length: int, b0: int, b1: int, bs: int) -> tuple[int, int]:
    """Byte (offset, length) of the run of blocks [b0, b1) of a chunk (the last block may be short)."""
    start = b0 * bs
    return chunk_offset + start, min(b1 * bs, chunk_length) - start


def stopped(rep: Replica, position: int, end: int) -> Interrupted:
    state = "not created yet" if rep.created else "unchanged"
    return Interrupted(
        f"{rep.path}: {state}; stopped at {position} of {end} bytes; run the same command again to resume"
    )


def _compare_with_state(
    s: Image,
    rep: Replica,
    res: SyncResult,
    st: StateRun,
    progress: Progress | None,
    stop: threading.Event | None,
    keep_cache: bool,
) -> None:
    """--state on this host: SRC's digests against the stored ones (or the replica's, read and hashed)."""
    bs = res.block_size
    stored = st.trusted(rep.trusts(st.old.expect if st.old else None))
    res.state = st.note
    sess = Session(bs, st.checksum, st.key, rep.resume_from, s.size)
    res.bytes_read += st.prepass(s, sess.start, bs, keep_cache, stored is not None)
    dst_read = [0]

    def replica_digests(offset: int, length: int) -> npt.NDArray[np.uint64] | None:
        img = rep.image
        if img is None or offset >= rep.dst_size:
            return None
        digests, _, n = chunk_digests(img, offset, length, bs, st.checksum, st.key, keep_cache, rep.dst_size)
        dst_read[0] += n
        return digests

    fig = run_sender(
        s, sess, stored or replica_digests, rep, progress=progress, stop=stop, keep_cache=keep_cache,
        dry_run=rep.dry_run, record=st.writer.add,
    )  # fmt: skip
    res.changed, res.zero = fig.changed, fig.zero
    res.bytes_read += fig.bytes_read + dst_read[0]


def _compare_into(
    s: Image,
    rep: Replica,
    res: SyncResult,
    progress: Progress | None,
    stop: threading.Event | None,
    workers: int,
    keep_cache: bool,
) -> None:
    """The local case: both images here, compared byte for byte, changes handed to the replica."""
    bs = res.block_size
    end = s.size
    for chunk in scan(
        s,
        rep.image,
        start=rep.resume_from,
        end=end,
        block_size=bs,
        dst_size=rep.dst_size,
        workers=workers,
        keep_cache=keep_cache,
        stop=stop,
    ):
        try:
            if not rep.dry_run:
                for b0, b1, zero in chunk.runs:
                    off, n = run_bytes(chunk.offset, chunk.length, b0, b1, bs)
                    if zero:
                        rep.zero(off, n)
                    else:
                        rel = off - chunk.offset
                        rep.data(off, chunk.src[rel : rel + n])
                rep.end_chunk(chunk.offset + chunk.length)
            res.count(chunk.runs)
            res.bytes_read += chunk.bytes_read
        finally:
            chunk.release()
        if progress:
            progress(chunk.offset + chunk.length, end)
        if stop is not None and stop.is_set() and chunk.offset + chunk.length < end:
            raise stopped(rep, chunk.offset + chunk.length, end)
    if progress:
        progress(end, end)  # the tail may have been holes on both sides, skipped without a chunk


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
        old = ((rec.offset, payload, rec.length) for rec, payload in iter_records(contents))
        return write_through_journal(d, jpath, h.old_size, h.block_size, old)


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
