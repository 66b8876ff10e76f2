"""The chunked, parallel reader: both images read once, compared block by block, in order.

Two worker threads read and compare chunks (I/O and the engine release the GIL);
the caller consumes results in offset order and hands buffers back, so memory is
bounded by ``workers * 2`` chunk buffers whatever the image size. Regions that are
holes in both images are never read. Within a chunk both images are read in
256 KiB pieces into two small per-thread buffers that stay in the CPU cache while
they are compared; only the changed blocks are copied out for the caller.
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
    """One compared chunk. ``src`` holds SRC's bytes of the changed runs (only those), until ``release()``."""

    offset: int
    length: int
    runs: list[Run]  # block indices relative to the chunk
    src: memoryview
    bytes_read: int
    _buf: bytearray | None = None
    _pool: queue.SimpleQueue[bytearray] | None = None

    def release(self) -> None:
        if self._buf is not None and self._pool is not None:
            self._pool.put(self._buf)
            self._buf = None


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
    pool: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
    depth = workers * 2
    made = [0]
    lock = threading.Lock()

    def take() -> bytearray:
        # Buffers are made on first need (a small image never pays for them), at most depth + 1.
        with lock:
            if pool.empty() and made[0] <= depth:
                made[0] += 1
                return bytearray(chunk_size)
        return pool.get()

    piece = max(PIECE, block_size)
    local = threading.local()

    def work(offset: int) -> Chunk:
        length = min(chunk_size, end - offset)
        segments = block_segments(
            src.data_in(offset, length),
            dst.data_in(offset, min(length, dst_size - offset)) if dst is not None else [],
            offset,
            block_size,
            length,
        )
        if not segments:  # holes on both sides: nothing to read
            return Chunk(offset, length, [], _ZEROS[:length], 0)
        if not hasattr(local, "a"):  # per thread: two pieces that stay in the CPU cache
            local.a, local.b = memoryview(bytearray(piece)), memoryview(bytearray(piece))
        buf = take()
        out = memoryview(buf)[:length]  # receives SRC's bytes of the changed blocks only
        read = 0
        runs: list[Run] = []
        for rel, n in segments:
            for p in range(rel, rel + n, piece):
                m = min(piece, rel + n - p)
                a, b = local.a[:m], local.b[:m]
                read += read_piece(src, a, offset + p, keep_cache)
                inside = max(0, min(m, dst_size - offset - p)) if dst is not None else 0
                if inside:
                    assert dst is not None
                    read += read_piece(dst, b[:inside], offset + p, keep_cache)
                if inside < m:
                    b[inside:] = _ZEROS[: m - inside]
                idx = diff_blocks(a, b, block_size)
                if not len(idx):
                    continue
                base = p // block_size
                for b0, b1, z in changed_runs(idx, zero_blocks(a, block_size)[idx]):
                    if not z:
                        lo, hi = b0 * block_size, min(b1 * block_size, m)
                        out[p + lo : p + hi] = a[lo:hi]
                    if runs and runs[-1][1] == b0 + base and runs[-1][2] == z:
                        runs[-1] = (runs[-1][0], b1 + base, z)  # continues the last run
                    else:
                        runs.append((b0 + base, b1 + base, z))
        return Chunk(offset, length, runs, out, read, buf, pool)

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


PIECE = 256 << 10  # read and compared while in the CPU cache; measured 7.7 GB/s vs 5-6.7 with 1 MiB


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
