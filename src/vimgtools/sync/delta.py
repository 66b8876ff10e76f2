"""Delta files: the blocks of SRC that differ from a signature, and their crash-atomic apply.

``write_delta(src, delta, against=sigfile)`` stores the blocks of SRC that differ from
that signature. ``apply_delta(delta, dst)`` checks that DST holds exactly the content
the signature was made of (its content digest, see ``signature``), then applies the
delta through a ``Replica`` (journaled, like a sync). A delta is a journal-format file
(magic ``VIMGDLTA``) whose header holds the digest algorithm, the key and the content
digest of the signature it was made against; it ends with a COMMIT record, so a
truncated delta is recognised.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from vimgtools.errors import ImageRefused, InvalidInput
from vimgtools.images import open_image
from vimgtools.journal import (
    DATA,
    DELTA_MAGIC,
    FLAG_SHRINK,
    Header,
    JournalWriter,
    iter_records,
    read_journal,
    remove_journal,
)
from vimgtools.sync.digests import CHECKSUMS, change_stream, digest_stream
from vimgtools.sync.replica import Replica, Source
from vimgtools.sync.signature import ContentDigest, Signature

Progress = Callable[[int, int], None]


class DeltaResult:
    """What writing or applying a delta did; ``vars()`` of it is the ``--json`` summary."""

    def __init__(self, blocks: int = 0) -> None:
        self.blocks = blocks
        self.changed = 0
        self.zero = 0
        self.bytes_read = 0
        self.delta_bytes = 0  # payload bytes in the delta
        self.bytes_written = 0
        self.journal_bytes = 0
        self.seconds = 0.0


def write_delta(
    src: str | os.PathLike[str],
    delta: str | os.PathLike[str],
    against: str | os.PathLike[str],
    *,
    block_size: int | None = None,
    progress: Progress | None = None,
    keep_cache: bool = False,
    dry_run: bool = False,
    fmt: str | None = None,
) -> DeltaResult:
    """Write the blocks of ``src`` (read as ``fmt``, see ``vimgtools.formats``) that differ from the signature ``against`` into ``delta``.

    ``block_size``, when given, must be the signature's (a check, not a choice). With
    ``dry_run`` SRC is compared and nothing is written (``delta_bytes``: what would be).
    """
    t0 = time.monotonic()
    sig = Signature(against)
    if block_size is not None and block_size != sig.block_size:
        sig.close()
        raise InvalidInput(
            f"{sig.path}: made with {sig.block_size}-byte blocks, not {block_size}", option="block_size"
        )
    res = DeltaResult()
    delta_path = Path(delta)
    try:
        bs = sig.block_size
        base_digest = sig.content_digest()
        with open_image(src, fmt=fmt, option="src_format") as img:
            res.blocks = -(-img.size // bs)
            header = Header(
                DELTA_MAGIC, bs, sig.size, img.size, FLAG_SHRINK if img.size < sig.size else 0, img.size,
                digest_name=sig.checksum.encode(), digest_key=sig.key, base_digest=base_digest,
            )  # fmt: skip
            writer = None if dry_run else JournalWriter(delta_path, header)
            try:
                for c in change_stream(
                    img, 0, img.size, bs, sig.checksum, sig.key, sig.digests, keep_cache=keep_cache
                ):
                    res.bytes_read += c.read
                    res.changed += c.changed
                    res.zero += c.zero
                    for off, n, payload in c.ranges:
                        if payload is None:
                            if writer is not None:
                                writer.zero(off, n)
                        elif writer is not None:
                            writer.data(off, payload)
                        else:
                            res.delta_bytes += n
                    if progress:
                        progress(c.offset + c.length, img.size)
                # Blocks of the base past our end are cut by the resize (FLAG_SHRINK): nothing to write.
                sig.finish_reading()
                sig.check_end()
                if writer is not None:
                    writer.commit()
                    res.delta_bytes = writer.data_bytes
            except BaseException:
                if writer is not None:
                    writer.close()
                    remove_journal(delta_path)
                raise
            if writer is not None:
                writer.close()
    finally:
        sig.close()
    res.seconds = time.monotonic() - t0
    return res


def apply_delta(
    delta: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    allow_shrink: bool = True,
    force: bool = False,
    dry_run: bool = False,
    journal: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    fmt: str | None = None,
) -> DeltaResult:
    """Apply ``delta`` to ``dst`` (in format ``fmt``) crash-atomically, after proving ``dst`` is the content it was made against.

    With ``dry_run`` every check is made and nothing is written.

    Raises:
        ImageRefused: the delta is truncated or damaged, or ``dst`` holds other content than the
            delta's base (nothing written, exit 2).
    """
    t0 = time.monotonic()
    delta_path = Path(delta)
    contents = read_journal(delta_path, DELTA_MAGIC)
    if not contents.committed:
        raise ImageRefused(
            f"{delta_path}: truncated or damaged delta (no intact end record); nothing written"
        )
    h = contents.header
    name = h.digest_name.decode(errors="replace")
    if name not in CHECKSUMS:
        raise ImageRefused(f"{delta_path}: unknown block digest {name!r}")
    dst_path = Path(dst)
    if not dst_path.exists():
        raise InvalidInput(f"{dst_path}: no such file or device (a delta applies to an existing image)")
    res = DeltaResult(blocks=-(-h.new_size // h.block_size))
    with open_image(dst_path, fmt=fmt, option="dst_format") as d:
        if d.size != h.old_size and not (d.is_block and d.size >= h.old_size):
            raise ImageRefused(
                f"{dst_path}: is {d.size} bytes; the delta was made against an image of {h.old_size} bytes"
            )
        acc = ContentDigest(h.block_size)
        for offset, length, digests, _, read in digest_stream(
            d, 0, h.old_size, h.block_size, name, h.digest_key
        ):
            res.bytes_read += read
            acc.add(digests)
            if progress:
                progress(offset + length, h.old_size)
        if acc.value != h.base_digest:
            raise ImageRefused(
                f"{dst_path}: holds other content than the image the delta was made against; nothing written"
            )
    with Replica(
        dst_path, Source(h.new_size), block_size=h.block_size, dry_run=dry_run,
        allow_shrink=allow_shrink, force=force, journal=journal, fmt=fmt,
    ) as rep, rep.receiving():  # fmt: skip
        for rec, payload in iter_records(contents):
            res.changed += -(-rec.length // h.block_size)
            if rec.kind == DATA and payload is not None:
                res.delta_bytes += len(payload)
                rep.data(rec.offset, payload)
            else:
                res.zero += -(-rec.length // h.block_size)
                rep.zero(rec.offset, rec.length)
    res.bytes_written, res.journal_bytes = rep.bytes_written, rep.journal_bytes
    res.seconds = time.monotonic() - t0
    return res
