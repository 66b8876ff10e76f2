"""Chunks, pieces and the one in-order pipeline every reader of an image goes through.

An image is worked on in ``CHUNK_SIZE`` chunks: the unit of the thread pipeline, of
progress, of a resume point (a journal CHECKPOINT, a CHUNK_END frame). It is a protocol
constant, not a file-format one: HELLO carries it and both ends must agree; a journal
whose checkpoint is not chunk-aligned is started over; signature, state and delta
files do not depend on it (their content digest groups digests by image bytes, see
``signature.DIGEST_GROUP``).

Within a chunk, data is read in ``PIECE``-sized pieces into small per-thread buffers
that are still in the CPU cache when they are compared or hashed.

The host's page cache is left as found (``CacheGuard``): when the pipeline takes a chunk
on, ahead of the readers, the pages of it already cached are noted and the rest is asked
for (POSIX_FADV_WILLNEED, several chunks in flight, at the device's sequential speed with
the kernel's own readahead off); once a piece is consumed, the pages of it that were not
cached before are given back.
"""

from __future__ import annotations

import contextlib
import mmap
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from threading import Lock, local
from typing import TypeVar

from vimgtools.errors import VimgError
from vimgtools.image import Image, Residency

CHUNK_SIZE = 8 << 20
# Chunks asked of the disk ahead of the one being consumed, over all the images a pass reads
# (POSIX_FADV_WILLNEED; page cache only, given back as consumed). Cold reads of SRC's data alone
# (4 GiB case, 2.5 GiB of data, interleaved rounds, busy machine): 8 ahead 2.7-3.1 s, 4 ahead
# 3.1-3.4 s, `cat` 4.4-5.6 s; --state 3.5 s with 8, 3.7 s with 4 (medians of 3). A compare of two
# images keeps 4 of each: 8 of each made the disk's queue deeper for no gain there.
READ_AHEAD = 8
# Read, then compared or hashed while still in the CPU cache. Alone, the engine is fastest on
# 256 KiB (7.7 GB/s against 5-6.7 on 1 MiB); in a run, each piece costs its thread two trips
# through the GIL, and 1 MiB took a warm 4 GiB --state run from 1.05 to 0.79 s and a compare from
# 1.04 to 0.93 s (512 KiB 0.89 / 1.01, 2 MiB 0.94 s; medians of 6 alternated runs; cold: no change).
PIECE = 1 << 20
ZEROS = memoryview(bytes(CHUNK_SIZE))

T = TypeVar("T")


def fresh_buffer(size: int) -> memoryview:
    """``size`` zero bytes of new, page-aligned memory: what every read lands in.

    Aligned: the kernel's copy out of the page cache into a buffer 16 bytes past a page boundary
    (where a ``bytearray`` of 1 MiB starts: malloc's header) ran at 1.7 GB/s here, into an
    aligned one at 7.5 GB/s (4 GiB read in 1 MiB pieces, warm). An anonymous mapping, whose pages
    the kernel zeroes when first touched: ``bytearray(size)`` writes every page first, and a
    buffer of changed blocks is mostly never touched. Private and in huge pages where the kernel
    gives them: filling 8 MiB of a shared (shmem) mapping took 10 ms in 2048 faults, of a private
    one 6.9 ms, in 2 MiB pages 0.8 ms (medians of 30)."""
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
    with contextlib.suppress(OSError, AttributeError):  # THP off, or not Linux
        buf.madvise(mmap.MADV_HUGEPAGE)
    return memoryview(buf)


def in_order(
    work: Callable[[int, memoryview], T],
    offsets: Iterable[int],
    workers: int,
    ahead: int,
    buffers: bool,
    guards: Sequence[CacheGuard] = (),
    read_ahead: int = READ_AHEAD,
) -> Generator[T, None, None]:
    """``work(offset, buffer)`` for each offset on ``workers`` threads, results yielded in order.

    At most ``ahead`` run ahead of the result yielded last; with ``buffers`` each gets a chunk
    buffer of its own that stays valid until the next result is asked for (``ahead + 1`` buffers
    made on first need and reused: a fresh 8 MiB buffer per chunk costs 2048 page faults).
    ``offsets`` is consumed lazily, from the caller's thread: it may stop early or skip ahead.
    Each of ``guards`` prepares a chunk when it is taken from ``offsets``, ``read_ahead`` chunks
    in all (shared among the guards; at least ``ahead`` of each) ahead of the result yielded
    last, so the disk has that much asked of it while the workers take ``ahead``; each is told
    when a chunk is done, and is closed at the end (giving back what was prepared and not read).
    """
    depth = max(ahead, read_ahead // max(1, len(guards)))
    free: list[memoryview] = []
    none = memoryview(b"")
    it = iter(offsets)
    taken: deque[int] = deque()  # prepared, not handed to a worker yet
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vimg-chunk") as ex:
            pending: deque[tuple[int, memoryview, Future[T]]] = deque()
            try:
                while True:
                    while len(pending) + len(taken) < depth and (offset := next(it, None)) is not None:
                        for g in guards:
                            g.prepare(offset)
                        taken.append(offset)
                    while len(pending) < ahead and taken:
                        offset = taken.popleft()
                        buf = none
                        if buffers:
                            buf = free.pop() if free else fresh_buffer(CHUNK_SIZE)
                        pending.append((offset, buf, ex.submit(work, offset, buf)))
                    if not pending:
                        return
                    offset, buf, fut = pending.popleft()
                    result = fut.result()
                    for g in guards:
                        g.done(offset)
                    yield result
                    if buffers:
                        free.append(buf)
            finally:
                for _, _, fut in pending:
                    fut.cancel()
    finally:  # after the pool's exit: no reader is left
        for g in guards:
            g.close()


def block_segments(
    a: list[tuple[int, int]], b: list[tuple[int, int]], base: int, bs: int, length: int
) -> list[tuple[int, int]]:
    """Merge two extent lists into chunk-relative, block-aligned (offset, length) segments.

    A segment ends at the chunk's length at the latest (an image's last block may be short).
    """
    spans = sorted(
        ((o - base) // bs * bs, min(-(-(o - base + n) // bs) * bs, length)) for o, n in (*a, *b) if n > 0
    )
    merged: list[list[int]] = []
    for lo, hi in spans:
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return [(lo, hi - lo) for lo, hi in merged]


Regions = Callable[[int, int], list[tuple[int, int]]]  # (offset, length) -> the extents inside it


class Extents:
    """Sorted extents as ``Regions``: called with (offset, length), those inside it, clipped.

    The only extents a pass may read and compare (a dirty bitmap's): elsewhere both images are
    known to be equal. Both ends of a remote sync use the same ones (HELLO carries them).
    """

    def __init__(self, extents: Iterable[tuple[int, int]]) -> None:
        merged: list[tuple[int, int]] = []
        for o, n in sorted(e for e in extents if e[1] > 0):
            if merged and o <= merged[-1][0] + merged[-1][1]:
                last = merged[-1]
                merged[-1] = (last[0], max(last[0] + last[1], o + n) - last[0])
            else:
                merged.append((o, n))
        self.extents = merged
        self._starts = [o for o, _ in merged]

    def __call__(self, offset: int, length: int) -> list[tuple[int, int]]:
        end, out = offset + length, []
        for o, n in self.extents[max(0, bisect_right(self._starts, offset) - 1) :]:
            if o >= end:
                break
            lo, hi = max(o, offset), min(o + n, end)
            if lo < hi:
                out.append((lo, hi - lo))
        return out

    def __len__(self) -> int:
        return len(self.extents)

    @property
    def bytes(self) -> int:
        return sum(n for _, n in self.extents)

    def coarsened(self, limit: int) -> Extents:
        """At most ``limit`` extents, the closest ones merged (what lies between is compared too)."""
        ext, gap = self.extents, 1
        while len(ext) > limit:
            gap *= 2
            ext = Extents((o, n + gap) for o, n in ext).extents
        return self if ext is self.extents else Extents(ext)

    def to_json(self) -> list[list[int]]:
        return [[o, n] for o, n in self.extents]

    @classmethod
    def from_json(cls, obj: object) -> Extents:
        """From a peer: a list of [offset, length] pairs of non-negative integers."""
        if not isinstance(obj, list) or not all(
            isinstance(e, list) and len(e) == 2 and all(type(x) is int and x >= 0 for x in e) for e in obj
        ):
            raise ValueError("regions: not a list of [offset, length] pairs")
        return cls((o, n) for o, n in obj)


class NotCached(Exception):
    """A read that was to come from the page cache alone would have gone to the disk."""


def read_piece(img: Image, view: memoryview, offset: int, keep_cache: bool, cached_only: bool = False) -> int:
    """Read ``view`` from ``offset``; pages this read brought in are given back unless ``keep_cache``.

    With ``cached_only``, raises NotCached if any of it was not in the page cache (before
    reading where residency can be learned so, see ``Image.read_back``): for reads outside a
    ``CacheGuard``.
    """
    got = img.read_back(view, offset, keep=keep_cache, cached_only=cached_only)
    if got is None:
        raise NotCached
    return got


class CacheGuard:
    """One pass over an image, chunk by chunk: read ahead, and give back the pages it brought in.

    ``prepare(chunk)`` (in order, ahead of the readers) notes which pages of the chunk are
    cached (``Image.residency``: cachestat(2), or mincore(2) where it is partly cached) and,
    unless ``fetch`` is off, asks for its data ranges (``Image.prefetch``). ``read`` reads a
    piece of a prepared chunk (preparing it if it was not) and drops the pages of it that were
    not cached before; ``done`` forgets a chunk; ``close`` gives back what was prepared and
    never read (a run stopped early). The kernel's readahead is off (``Image.no_readahead``):
    it would bring in pages that were noted as not ours to drop. Where residency cannot be
    learned (``Image.cache_probe`` "nowait"), reads learn it with RWF_NOWAIT and nothing is
    read ahead, as ``read_piece`` does. With ``keep_cache`` nothing is noted or dropped.

    Args:
        img: the image.
        end: where this pass stops reading (chunks past it are not prepared).
        keep_cache: leave what is read in the page cache.
        fetch: read ahead (off for a pass that reads only what is cached already).
        regions: the pass reads only these extents (a dirty bitmap's): only they are read ahead,
            all of a chunk's at once, so that a cold disk has them all asked of it together.
    """

    def __init__(
        self, img: Image, end: int, keep_cache: bool, *, fetch: bool = True, regions: Regions | None = None
    ) -> None:
        self.img, self.end, self.keep, self.fetch = img, min(end, img.size), keep_cache, fetch
        self.regions = regions
        self.nowait = not keep_cache and img.cache_probe() == "nowait"
        if not keep_cache:
            img.no_readahead()
        self._seen: dict[int, Residency | None] = {}
        self._lock = Lock()

    def prepare(self, offset: int) -> None:
        """Note what of the chunk at ``offset`` is cached, and ask for the rest."""
        length = min(CHUNK_SIZE, self.end - offset)
        if length <= 0 or self.nowait:
            return
        with self._lock:
            if offset in self._seen:
                return
            asked = not self.keep or not self.fetch  # residency is needed to give back, or to refuse
            r = self.img.residency(offset, length) if asked else None
            self._seen[offset] = r
            if self.fetch and (r is False or isinstance(r, bytes) or not asked):
                for o, n in self._ranges(offset, length):
                    self.img.prefetch(o, n)

    def _ranges(self, offset: int, length: int) -> list[tuple[int, int]]:
        return self.img.data_in(offset, length) if self.regions is None else self.regions(offset, length)

    def read(self, view: memoryview, offset: int, cached_only: bool = False) -> int:
        """``read_piece`` within a prepared chunk: raises NotCached (before reading) with ``cached_only``."""
        if self.nowait:
            return read_piece(self.img, view, offset, self.keep, cached_only)
        chunk = offset - offset % CHUNK_SIZE
        if chunk not in self._seen:
            self.prepare(chunk)
        r = self._seen.get(chunk)
        if r is None and (cached_only or not self.keep):  # residency unknown here: learn it reading
            return read_piece(self.img, view, offset, self.keep, cached_only)
        if cached_only and r is not True:
            raise NotCached
        got, _ = self.img.read_into(view, offset, probe=False)
        if not self.keep and r is not None:
            self.img.give_back(chunk, r, offset, len(view))
        return got

    def done(self, offset: int) -> None:
        with self._lock:
            self._seen.pop(offset, None)

    def close(self) -> None:
        """Give back what was prepared (read ahead) and not read."""
        with self._lock:
            seen, self._seen = self._seen, {}
        if self.keep or not self.fetch:  # nothing was read ahead
            return
        scratch = fresh_buffer(1 << 20)
        for chunk, r in seen.items():
            if r is None or r is True:
                continue
            length = min(CHUNK_SIZE, self.end - chunk)
            # Pages still being read in are locked, and POSIX_FADV_DONTNEED passes them by: wait
            # for them first (a read of what is, by now, mostly in memory).
            with contextlib.suppress(VimgError):
                for o, n in self._ranges(chunk, length):
                    for p in range(o, o + n, len(scratch)):
                        self.img.read_into(scratch[: min(len(scratch), o + n - p)], p, probe=False)
            self.img.give_back(chunk, r, chunk, length)


_local = local()


def pieces(
    img: Image,
    offset: int,
    length: int,
    bs: int,
    keep_cache: bool,
    size: int | None,
    cached_only: bool = False,
    guard: CacheGuard | None = None,
    regions: Regions | None = None,
) -> Iterator[tuple[int, memoryview, int]]:
    """(chunk-relative position, bytes, bytes read) of the allocated blocks of a chunk, a piece at a time.

    Each piece is read into a small per-thread buffer that is still in the CPU cache when the
    caller hashes it: reading a whole chunk into RAM first costs a second trip through memory.
    Holes are skipped (their blocks are zeros); bytes at or past ``size`` (default: the image's
    size) read as zeros. The buffer is reused for the next piece. Reads go through ``guard``
    when given (``keep_cache`` is then its business), else through ``read_piece``. With
    ``regions`` only those extents are read (the rest counts as holes).
    """
    limit = img.size if size is None else min(size, img.size)
    inside = max(0, min(length, limit - offset))
    if not inside:
        return
    piece = max(PIECE, bs, img.request_size)
    buf: memoryview | None = getattr(_local, "buf", None)
    if buf is None or len(buf) < piece:
        buf = _local.buf = fresh_buffer(piece)
    found = img.data_in(offset, inside) if regions is None else regions(offset, inside)
    for rel, n in block_segments(found, [], offset, bs, length):
        for p in range(rel, rel + n, piece):
            m = min(piece, rel + n - p)
            view = buf[:m]
            have = max(0, min(m, inside - p))
            if not have:
                read = 0
            elif guard is not None:
                read = guard.read(view[:have], offset + p, cached_only)
            else:
                read = read_piece(img, view[:have], offset + p, keep_cache, cached_only)
            if have < m:
                view[have:] = ZEROS[: m - have]
            yield p, view, read
