"""Undo files: the old content of what a sync overwrote, and ``rollback`` to that generation.

An undo file is a journal-format file (magic ``VIMGUNDO``, see ``vimgtools.journal``): each
record holds the old content of a range and, in ``aux``, the checksum of the new content,
so a rollback first proves the replica still holds the generation that sync wrote.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from vimgtools.blocks import checksum64, diff_runs
from vimgtools.errors import ImageRefused, JournalError
from vimgtools.image import Image
from vimgtools.images import open_image
from vimgtools.journal import (
    MAX_RECORD,
    UNDO_MAGIC,
    Header,
    JournalContents,
    JournalWriter,
    Record,
    committed_journal,
    iter_records,
    journal_path_for,
    read_journal,
    recover_image,
    write_through_journal,
)
from vimgtools.sync.chunks import CHUNK_SIZE, ZEROS, fresh_buffer

if TYPE_CHECKING:
    from typing_extensions import Buffer

PREFETCH_BYTES = 32 << 20  # old content asked for ahead (the batch's new payloads are held meanwhile)


def _zero(view: memoryview) -> bool:
    """All zeros (numpy's zero_blocks would cost its import, ~0.1 s of every run)."""
    return not any(
        diff_runs(view[i : i + CHUNK_SIZE], ZEROS[: len(view[i : i + CHUNK_SIZE])], CHUNK_SIZE)
        for i in range(0, len(view), CHUNK_SIZE)
    )


class UndoWriter:
    """An undo file being written: for each range a sync will overwrite, its old content and the
    checksum of the new (what ``rollback`` checks the replica still holds). Durable at ``commit``,
    which must come before the journal's."""

    def __init__(self, path: Path, old_size: int, header: Header) -> None:
        uheader = Header(UNDO_MAGIC, header.block_size, old_size, header.new_size, 0, dst_id=header.dst_id)
        self._writer = JournalWriter(path, uheader)

    def add(self, offset: int, old: Buffer, new: Buffer | None) -> None:
        """``old``: the replica's bytes at ``offset`` now; ``new``: what will be written (None: zeros)."""
        oldv = memoryview(old).cast("B")
        newv = memoryview(new).cast("B") if new is not None else None
        for start in range(0, len(oldv), MAX_RECORD):  # one checksum per record: at most MAX_RECORD
            o = oldv[start : start + MAX_RECORD]
            new_sum = checksum64(newv[start : start + len(o)] if newv is not None else bytes(len(o)))
            if _zero(o):
                self._writer.zero(offset + start, len(o), aux=new_sum)
            else:
                self._writer.data(offset + start, o, aux=new_sum)

    def commit(self) -> int:
        """Durable; returns the bytes of old content kept."""
        self._writer.commit()
        return self._writer.data_bytes

    def close(self) -> None:
        self._writer.close()


def write_undo(path: Path, d: Image, journal: JournalContents, header: Header) -> int:
    """Keep the old content of everything the journal will overwrite, read from ``d`` (durable
    before any write). A sync that compared the replica keeps it as it reads instead (``UndoWriter``)."""
    undo = UndoWriter(path, d.size, header)
    try:
        buf = fresh_buffer(CHUNK_SIZE)
        for batch in _batches(iter_records(journal), PREFETCH_BYTES):
            for rec, _ in batch:  # asked of the disk at once: scattered ranges read cold one by one,
                d.prefetch(rec.offset, rec.length)  # each waited for (~2 ms here), were most of a run
            for rec, payload in batch:
                view = buf[: rec.length]
                d.read_into(view, rec.offset, probe=False)
                undo.add(rec.offset, view, payload)
        return undo.commit()
    finally:
        undo.close()


def _batches(
    records: Iterator[tuple[Record, bytes | None]], most: int
) -> Iterator[list[tuple[Record, bytes | None]]]:
    """Consecutive records, each batch at most ``most`` bytes long (or one record), payloads held."""
    batch: list[tuple[Record, bytes | None]] = []
    size = 0
    for rec in records:
        if batch and size + rec[0].length > most:
            yield batch
            batch, size = [], 0
        batch.append(rec)
        size += rec[0].length
    if batch:
        yield batch


def rollback(
    dst: str | os.PathLike[str],
    undo: str | os.PathLike[str],
    *,
    dry_run: bool = False,
    fmt: str | None = None,
) -> int:
    """Return ``dst`` to the generation before the sync that wrote ``undo``. Returns bytes written.

    With ``dry_run`` every check is made and nothing is written; the bytes that would be written
    are returned. Refuses (ImageRefused) when ``dst`` holds neither what that sync wrote nor what
    it found (a range of it that is still the old content: that sync died before writing), and
    (dry run) when an interrupted update must be completed first.
    """
    upath = Path(undo)
    contents = read_journal(upath, UNDO_MAGIC)
    if not contents.committed:
        raise JournalError(f"{upath}: incomplete undo file (its sync never reached the point of writing)")
    h = contents.header
    with open_image(dst, fmt=fmt, write=not dry_run, option="dst_format") as d:
        jpath = journal_path_for(d)
        if dry_run:
            if committed_journal(jpath) is not None:
                raise ImageRefused(
                    f"{d.path}: an interrupted update must be completed first (it is committed in {jpath}); "
                    "run the rollback without dry run, or recover first"
                )
        else:
            d.lock_exclusive("rollback")
            recover_image(d, jpath)
            d.refresh_size()
        if d.size != h.new_size and not d.is_block:
            raise ImageRefused(f"{d.path}: is {d.size} bytes, the undo file is for {h.new_size} bytes")
        buf = fresh_buffer(CHUNK_SIZE)
        would = 0
        for rec, payload in iter_records(contents):
            view = buf[: rec.length]
            d.read_into(view, rec.offset, probe=False)
            # The old content already: the sync died after committing this file, before its journal
            # (nothing of it was written); writing it again is harmless.
            unwritten = _zero(view) if payload is None else view == payload
            if checksum64(view) != rec.aux and not unwritten:
                raise ImageRefused(
                    f"{d.path}: changed since the sync that wrote {upath} "
                    f"(offset {rec.offset}); not rolled back"
                )
            would += rec.length if payload is not None else 0
        if dry_run:
            return would
        old = ((rec.offset, payload, rec.length) for rec, payload in iter_records(contents))
        return write_through_journal(d, jpath, h.old_size, h.block_size, old)
