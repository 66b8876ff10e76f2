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

import numpy as np

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
    pool: queue.SimpleQueue[tuple[bytearray, bytearray]] = queue.SimpleQueue()
    depth = workers * 2
    for _ in range(depth + 1):
        pool.put((bytearray(chunk_size), bytearray(chunk_size)))

    def work(offset: int) -> Chunk:
        length = min(chunk_size, end - offset)
        src_hole = src.is_hole(offset, length)
        dst_hole = dst is None or offset >= dst_size or dst.is_hole(offset, length)
        if src_hole and dst_hole:
            z = _ZEROS[:length]
            return Chunk(offset, length, [], z, z, 0)
        bufs = pool.get()
        sview = memoryview(bufs[0])[:length]
        dview = memoryview(bufs[1])[:length]
        read = 0
        if src_hole:
            sview = _ZEROS[:length]
        else:
            read += _read(src, sview, offset, length, keep_cache)
        if dst_hole:
            dview = _ZEROS[:length]
        else:
            assert dst is not None
            # Past dst's end it reads as zeros: only the part inside dst comes from disk.
            inside = max(0, min(length, dst_size - offset))
            read += _read(dst, dview[:inside], offset, inside, keep_cache)
            if inside < length:
                dview[inside:] = _ZEROS[: length - inside]
        if dst_hole:  # everything non-zero in src changed
            zero = zero_blocks(sview, block_size)
            idx = np.flatnonzero(~zero).astype(np.int64)
            runs = changed_runs(idx, np.zeros(len(idx), dtype=np.bool_))
        elif src_hole:  # everything non-zero in dst must become zeros
            idx = np.flatnonzero(~zero_blocks(dview, block_size)).astype(np.int64)
            runs = changed_runs(idx, np.ones(len(idx), dtype=np.bool_))
        else:
            idx = diff_blocks(sview, dview, block_size)
            runs = changed_runs(idx, zero_blocks(sview, block_size)[idx]) if len(idx) else []
        return Chunk(offset, length, runs, sview, dview, read, bufs, pool)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vimg-scan") as ex:
        pending: deque[Future[Chunk]] = deque()
        next_offset = start
        try:
            while pending or next_offset < end:
                while len(pending) < depth and next_offset < end and not (stop and stop.is_set()):
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


def _read(img: Image, view: memoryview, offset: int, length: int, keep_cache: bool) -> int:
    got, cached = img.read_into(view[:length], offset)
    if not cached and not keep_cache:
        # We brought these pages in; give them back so a nightly run does not evict the host's cache.
        img.drop_cache(offset, length)
    return got
