"""Chunks, pieces and the one in-order pipeline every reader of an image goes through.

An image is worked on in ``CHUNK_SIZE`` chunks: the unit of the thread pipeline, of
progress, of a resume point (a journal CHECKPOINT, a CHUNK_END frame). It is a protocol
constant, not a file-format one: HELLO carries it and both ends must agree; a journal
whose checkpoint is not chunk-aligned is started over; signature, state and delta
files do not depend on it (their content digest groups digests by image bytes, see
``signature.DIGEST_GROUP``).

Within a chunk, data is read in ``PIECE``-sized pieces into small per-thread buffers
that are still in the CPU cache when they are compared or hashed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from threading import local
from typing import TypeVar

from vimgtools.image import Image

CHUNK_SIZE = 8 << 20
PIECE = 256 << 10  # read and compared while in the CPU cache; measured 7.7 GB/s vs 5-6.7 with 1 MiB
ZEROS = memoryview(bytes(CHUNK_SIZE))

T = TypeVar("T")


def in_order(
    work: Callable[[int, memoryview], T], offsets: Iterable[int], workers: int, ahead: int, buffers: bool
) -> Generator[T, None, None]:
    """``work(offset, buffer)`` for each offset on ``workers`` threads, results yielded in order.

    At most ``ahead`` run ahead of the result yielded last; with ``buffers`` each gets a chunk
    buffer of its own that stays valid until the next result is asked for (``ahead + 1`` buffers
    made on first need and reused: a fresh 8 MiB buffer per chunk costs 2048 page faults).
    ``offsets`` is consumed lazily, from the caller's thread: it may stop early or skip ahead.
    """
    free: list[memoryview] = []
    none = memoryview(b"")
    it = iter(offsets)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vimg-chunk") as ex:
        pending: deque[tuple[memoryview, Future[T]]] = deque()
        try:
            while True:
                while len(pending) < ahead and (offset := next(it, None)) is not None:
                    buf = none
                    if buffers:
                        buf = free.pop() if free else memoryview(bytearray(CHUNK_SIZE))
                    pending.append((buf, ex.submit(work, offset, buf)))
                if not pending:
                    return
                buf, fut = pending.popleft()
                yield fut.result()
                if buffers:
                    free.append(buf)
        finally:
            for _, fut in pending:
                fut.cancel()


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


class NotCached(Exception):
    """A read that was to come from the page cache alone would have gone to the disk."""


def read_piece(img: Image, view: memoryview, offset: int, keep_cache: bool, cached_only: bool = False) -> int:
    """Read ``view`` from ``offset``; pages this read brought in are given back unless ``keep_cache``.

    With ``cached_only``, raises NotCached (after reading) if any of it was not in the page cache.
    """
    got, cached = img.read_into(view, offset)
    if not cached and not keep_cache:
        # We brought these pages in; give them back so a nightly run does not evict the host's cache.
        img.drop_cache(offset, len(view))
    if cached_only and not cached:
        raise NotCached
    return got


_local = local()


def pieces(
    img: Image,
    offset: int,
    length: int,
    bs: int,
    keep_cache: bool,
    size: int | None,
    cached_only: bool = False,
) -> Iterator[tuple[int, memoryview, int]]:
    """(chunk-relative position, bytes, bytes read) of the allocated blocks of a chunk, a piece at a time.

    Each piece is read into a small per-thread buffer that is still in the CPU cache when the
    caller hashes it: reading a whole chunk into RAM first costs a second trip through memory.
    Holes are skipped (their blocks are zeros); bytes at or past ``size`` (default: the image's
    size) read as zeros. The buffer is reused for the next piece.
    """
    limit = img.size if size is None else min(size, img.size)
    inside = max(0, min(length, limit - offset))
    if not inside:
        return
    piece = max(PIECE, bs)
    buf: memoryview | None = getattr(_local, "buf", None)
    if buf is None or len(buf) < piece:
        buf = _local.buf = memoryview(bytearray(piece))
    for rel, n in block_segments(img.data_in(offset, inside), [], offset, bs, length):
        for p in range(rel, rel + n, piece):
            m = min(piece, rel + n - p)
            view = buf[:m]
            have = max(0, min(m, inside - p))
            read = read_piece(img, view[:have], offset + p, keep_cache, cached_only) if have else 0
            if have < m:
                view[have:] = ZEROS[: m - have]
            yield p, view, read
