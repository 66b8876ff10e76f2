"""The local sync: both images on this host, compared byte for byte (or SRC against a state file).

Changes reach the replica through ``Replica.receiving()`` (journal, resume, holes).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from vimgtools.errors import ImageError, Interrupted
from vimgtools.image import Image
from vimgtools.images import open_image
from vimgtools.sync.chunks import CHUNK_SIZE, CacheGuard
from vimgtools.sync.compare import scan
from vimgtools.sync.digests import Digests, hash_chunk
from vimgtools.sync.options import SyncOptions
from vimgtools.sync.replica import Replica, source_of
from vimgtools.sync.result import SyncResult, take_source
from vimgtools.sync.sender import Session, run_sender
from vimgtools.sync.state import StateRun

Progress = Callable[[int, int], None]


def sync_local(
    src: Path,
    dst: Path,
    opts: SyncOptions,
    *,
    progress: Progress | None,
    stop: threading.Event | None,
    since_bitmap: str | None = None,
) -> SyncResult:
    """A local sync. With ``since_bitmap`` (a dirty bitmap of a qcow2 SRC, started when DST last
    equalled SRC) only the extents it marks are read and compared: the rest is known equal."""
    with open_image(src, fmt=opts.src_format, option="src_format", bitmap=since_bitmap) as s:
        regions = s.dirty_in if since_bitmap else None
        return sync_from(s, dst, opts, progress=progress, stop=stop, regions=regions)


def sync_from(
    s: Image,
    dst: Path,
    opts: SyncOptions,
    *,
    progress: Progress | None,
    stop: threading.Event | None,
    regions: Callable[[int, int], list[tuple[int, int]]] | None = None,
) -> SyncResult:
    """Sync an open source image into DST (a local sync once SRC is open; a running guest's
    point-in-time export for replicate). ``regions(offset, length)``: the only extents that may
    differ (a dirty bitmap's); None: all of it."""
    t0 = time.monotonic()
    src = s.path
    res = SyncResult(str(src), str(dst), opts.block_size, dry_run=opts.dry_run)
    take_source(res, s)
    with Replica.for_sync(dst, source_of(s), opts) as rep:
        st = StateRun(opts.state, opts.block_size, opts.checksum, s.size) if opts.state else None
        try:
            with rep.receiving(opts.undo, with_old=st is None):  # the compare reads the old content
                if st is None:
                    _compare_into(s, rep, res, opts, progress, stop, regions)
                else:
                    _compare_with_state(s, rep, res, st, opts, progress, stop)
            after = rep.expect_after() if st is not None else None
            if st is not None:
                if after is None:
                    st.writer.abort()
                else:
                    st.writer.finish(after)
        except BaseException:
            if st is not None:
                st.writer.abort()
            raise
        finally:
            if st is not None:
                st.close()
        res.take_replica(rep.figures())
    if opts.verify and not opts.dry_run:
        res.verified = verify_local(s, dst, opts)
        if not res.verified:
            raise ImageError(f"{dst}: verification failed: it differs from {src}")
    res.seconds = time.monotonic() - t0
    return res


def _compare_with_state(
    s: Image,
    rep: Replica,
    res: SyncResult,
    st: StateRun,
    opts: SyncOptions,
    progress: Progress | None,
    stop: threading.Event | None,
) -> None:
    """--state on this host: SRC's digests against the stored ones (or the replica's, read and hashed)."""
    bs, keep_cache = res.block_size, opts.keep_cache
    stored = st.trusted(rep.trusts(st.old.expect if st.old else None))
    res.state = st.note
    sess = Session(bs, st.checksum, st.key, rep.resume_from, s.size, opts.workers)
    res.bytes_read += st.prepass(s, sess, keep_cache, stored is not None)
    dst_read = [0]
    # The replica is hashed chunk by chunk, in order, as the sender asks: read one chunk ahead.
    guard = CacheGuard(rep.image, rep.dst_size, keep_cache) if rep.image is not None else None

    def replica_digests(offset: int, length: int) -> Digests | None:
        img = rep.image
        if img is None or guard is None or offset >= rep.dst_size:
            return None
        guard.prepare(offset)
        guard.prepare(offset + CHUNK_SIZE)
        digests, _, n = hash_chunk(
            img, offset, length, bs, st.checksum, st.key, keep_cache, rep.dst_size, guard=guard
        )
        guard.done(offset)
        dst_read[0] += n
        return digests

    try:
        fig = run_sender(
            s, sess, stored or replica_digests, rep, progress=progress, stop=stop, keep_cache=keep_cache,
            dry_run=rep.dry_run, record=st.writer.add,
        )  # fmt: skip
    finally:
        if guard is not None:
            guard.close()
    res.changed, res.zero = fig.changed, fig.zero
    res.bytes_read += fig.bytes_read + dst_read[0]


def _compare_into(
    s: Image,
    rep: Replica,
    res: SyncResult,
    opts: SyncOptions,
    progress: Progress | None,
    stop: threading.Event | None,
    regions: Callable[[int, int], list[tuple[int, int]]] | None = None,
) -> None:
    """Both images here, compared byte for byte (only ``regions``, when given), changes handed to the replica."""
    bs = res.block_size
    end = s.size
    keep_old = rep.wants_old
    for chunk in scan(
        s, rep.image, start=rep.resume_from, end=end, block_size=bs, dst_size=rep.dst_size,
        workers=opts.workers, keep_cache=opts.keep_cache, stop=stop, regions=regions, keep_old=keep_old,
    ):  # fmt: skip
        if not rep.dry_run:
            for i, (b0, b1, zero) in enumerate(chunk.runs):
                start = b0 * bs
                off, n = chunk.offset + start, min(b1 * bs, chunk.length) - start
                old = chunk.old[i] if keep_old else None
                if zero:
                    rep.zero(off, n, old)
                else:
                    rep.data(off, chunk.src[start : start + n], old)
            rep.end_chunk(chunk.offset + chunk.length)
        res.count(chunk.runs)
        res.bytes_read += chunk.bytes_read
        if progress:
            progress(chunk.offset + chunk.length, end)
        if stop is not None and stop.is_set() and chunk.offset + chunk.length < end:
            state = "not created yet" if rep.created else "unchanged"
            raise Interrupted(
                f"{rep.path}: {state}; stopped at {chunk.offset + chunk.length} of {end} bytes; "
                "run the same command again to resume"
            )
    if progress:
        progress(end, end)  # the tail may have been holes on both sides, skipped without a chunk


def verify_local(s: Image, dst: Path, opts: SyncOptions) -> bool:
    """Read the replica back (from the disk, not our cached writes) and compare it with SRC."""
    with open_image(dst, fmt=opts.dst_format, option="dst_format") as d:
        if not d.is_block and d.size != s.size:
            return False
        d.drop_cache(0, 0)
        for chunk in scan(
            s, d, start=0, end=s.size, block_size=opts.block_size, dst_size=d.size, workers=opts.workers
        ):
            if chunk.runs:
                return False
    return True
