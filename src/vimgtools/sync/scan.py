"""The chunked, parallel reader: both images read once, compared block by block, in order.

Two worker threads read and compare chunks (I/O and the engine release the GIL);
the caller consumes results in offset order and hands buffers back, so memory is
bounded by ``workers * 2`` chunk pairs whatever the image size. Regions that are
holes in both images are never read.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from vimgtools.blocks import Run, changed_runs, diff_blocks, zero_blocks
from vimgtools.image import Image

CHUNK_SIZE = 8 << 20
_ZEROS = memoryview(bytes(CHUNK_SIZE))


@dataclass
class Chunk:
    """One compared chunk. ``src``/``dst`` views are valid until ``release()``."""

    offset: int
    length: int
    runs: list[Run]  # block indices relative to the chunk
    src: memoryview
    dst: memoryview
    bytes_read: int
    _bufs: tuple[bytearray, bytearray] | None = None
    _pool: queue.SimpleQueue[tuple[bytearray, bytearray]] | None = None

    def release(self) -> None:
        if self._bufs is not None and self._pool is not None:
            self._pool.put(self._bufs)
            self._bufs = None


def scan(
    src: Image,
    dst: Image | None,
    *,
    start: int,
    end: int,
    block_size: int,
    dst_size: int,
    workers: int = 2,
    chunk_size: int = CHUNK_SIZE,
    keep_cache: bool = False,
    stop: threading.Event | None = None,
) -> Iterator[Chunk]:
    """Yield the chunks of [start, end) with the runs of blocks where ``src`` differs from ``dst``.

    ``dst`` None (or past ``dst_size``) reads as zeros. ``start`` must be chunk-aligned.
    Each yielded chunk must be ``release()``d by the caller.
    """
    if not keep_cache:
        for img in (src, dst):
            if img is not None:
                img.no_readahead()
    pool: queue.SimpleQueue[tuple[bytearray, bytearray]] = queue.SimpleQueue()
    depth = workers * 2
    made = [0]
    lock = threading.Lock()

    def take() -> tuple[bytearray, bytearray]:
        # Buffers are made on first need (a small image never pays for them), at most depth + 1 pairs.
        with lock:
            if pool.empty() and made[0] <= depth:
                made[0] += 1
                return bytearray(chunk_size), bytearray(chunk_size)
        return pool.get()

    def work(offset: int) -> Chunk:
        length = min(chunk_size, end - offset)
        segments = _union(
            src.data_in(offset, length),
            dst.data_in(offset, min(length, dst_size - offset)) if dst is not None else [],
            offset,
            block_size,
        )
        if not segments:  # holes on both sides: nothing to read
            z = _ZEROS[:length]
            return Chunk(offset, length, [], z, z, 0)
        bufs = take()
        sview = memoryview(bufs[0])[:length]
        dview = memoryview(bufs[1])[:length]
        read = 0
        runs: list[Run] = []
        for rel, n in segments:
            # Only where either side has data; each segment compared while it is still in cache.
            s_seg, d_seg = sview[rel : rel + n], dview[rel : rel + n]
            read += _read(src, s_seg, offset + rel, keep_cache)
            if dst is not None and offset + rel < dst_size:
                inside = min(n, dst_size - offset - rel)
                read += _read(dst, d_seg[:inside], offset + rel, keep_cache)
                if inside < n:
                    d_seg[inside:] = _ZEROS[: n - inside]
            else:
                d_seg[:] = _ZEROS[:n]
            idx = diff_blocks(s_seg, d_seg, block_size)
            if len(idx):
                base = rel // block_size
                runs += [
                    (b0 + base, b1 + base, z)
                    for b0, b1, z in changed_runs(idx, zero_blocks(s_seg, block_size)[idx])
                ]
        return Chunk(offset, length, runs, sview, dview, read, bufs, pool)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vimg-scan") as ex:
        pending: deque[Future[Chunk]] = deque()
        next_offset = start
        try:
            while pending or next_offset < end:
                while len(pending) < depth and next_offset < end and not (stop and stop.is_set()):
                    next_offset = _skip_holes(src, dst, dst_size, next_offset, end, chunk_size)
                    if next_offset >= end:
                        break
                    pending.append(ex.submit(work, next_offset))
                    next_offset += chunk_size
                if not pending:
                    break
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()
            for f in pending:
                if not f.cancelled():
                    with contextlib.suppress(Exception):
                        f.result().release()


def _skip_holes(src: Image, dst: Image | None, dst_size: int, offset: int, end: int, chunk_size: int) -> int:
    """Jump over whole chunks that are holes on both sides (a mostly empty 64 GiB image is 8192 chunks)."""
    nd = src.next_data(offset)
    if dst is not None and offset < dst_size:
        nd = min(nd, dst.next_data(offset))
    if nd >= end:
        return end
    return offset + (nd - offset) // chunk_size * chunk_size


def read_chunk(img: Image, offset: int, view: memoryview, keep_cache: bool) -> int:
    """Fill ``view`` with the image from ``offset``: data extents read, holes zero-filled."""
    length = len(view)
    pos = 0
    read = 0
    for start, n in img.data_in(offset, length):
        rel = start - offset
        if rel > pos:
            view[pos:rel] = _ZEROS[: rel - pos]
        read += _read(img, view[rel : rel + n], start, keep_cache)
        pos = rel + n
    if pos < length:
        view[pos:] = _ZEROS[: length - pos]
    return read


SEGMENT = 1 << 20  # compare in pieces that stay in the CPU cache between read and compare


def _union(a: list[tuple[int, int]], b: list[tuple[int, int]], base: int, bs: int) -> list[tuple[int, int]]:
    """Merge two extent lists into chunk-relative, block-aligned segments of at most SEGMENT bytes."""
    spans = sorted((((o - base) // bs * bs), -(-(o - base + n) // bs) * bs) for o, n in (*a, *b) if n > 0)
    merged: list[list[int]] = []
    for lo, hi in spans:
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    out = []
    for lo, hi in merged:
        for p in range(lo, hi, SEGMENT):
            out.append((p, min(SEGMENT, hi - p)))
    return out


def _read(img: Image, view: memoryview, offset: int, keep_cache: bool) -> int:
    got, cached = img.read_into(view, offset)
    if not cached and not keep_cache:
        # We brought these pages in; give them back so a nightly run does not evict the host's cache.
        img.drop_cache(offset, len(view))
    return got
