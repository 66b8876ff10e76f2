"""The local compare: both images read once, side by side, block by block, in order.

Chunks go through the shared pipeline (``chunks.in_order``: two threads, I/O and the
engine release the GIL), so memory is bounded whatever the image size. Regions that
are holes in both images are never read. Within a chunk both images are read in
pieces into two small per-thread buffers that stay in the CPU cache while they are
compared; only the changed blocks are copied out for the caller. Each image's reads go
through a ``chunks.CacheGuard``: read ahead of the comparison, the host's page cache left
as found.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import NamedTuple

from vimgtools.blocks import Run, diff_runs
from vimgtools.image import Image
from vimgtools.sync.chunks import CHUNK_SIZE, PIECE, ZEROS, CacheGuard, block_segments, fresh_buffer, in_order


class Chunk(NamedTuple):
    """One compared chunk. ``src`` holds SRC's bytes of the changed runs (only those) until the next chunk."""

    offset: int
    length: int
    runs: list[Run]  # block indices relative to the chunk
    src: memoryview
    bytes_read: int
    old: list[bytearray]  # with keep_old: DST's bytes of each run (else empty)


def scan(
    src: Image,
    dst: Image | None,
    *,
    start: int,
    end: int,
    block_size: int,
    dst_size: int,
    workers: int = 2,
    keep_cache: bool = False,
    stop: threading.Event | None = None,
    regions: Callable[[int, int], list[tuple[int, int]]] | None = None,
    keep_old: bool = False,
) -> Iterator[Chunk]:
    """Yield the chunks of [start, end) with the runs of blocks where ``src`` differs from ``dst``.

    ``dst`` None (or past ``dst_size``) reads as zeros. ``start`` must be chunk-aligned.
    A chunk's ``src`` bytes stay valid until the next chunk is asked for. With ``regions``
    (``regions(offset, length)``: extents, e.g. a dirty bitmap's) only those are read and
    compared: elsewhere SRC and DST are known to be equal, and chunks without any are skipped.
    With ``keep_old`` each chunk also holds DST's bytes of each of its runs (``old``, beside
    ``runs``): what an undo file keeps, without reading DST a second time.
    """
    # With regions only they are read ahead: whole chunks would read 8 MiB of each image for every
    # dirty 64 KiB (4 GiB of a replica for 1% of scattered writes, cold).
    guards = [CacheGuard(src, end, keep_cache, regions=regions)]
    if dst is not None:
        guards.append(CacheGuard(dst, min(end, dst_size), keep_cache, regions=regions))
    read_src, read_dst = guards[0].read, guards[-1].read
    piece = max(PIECE, block_size, src.request_size, dst.request_size if dst is not None else 0)
    local = threading.local()

    def work(offset: int, buf: memoryview) -> Chunk:
        length = min(CHUNK_SIZE, end - offset)
        if regions is not None:
            segments = block_segments(regions(offset, length), [], offset, block_size, length)
        else:
            segments = block_segments(
                src.data_in(offset, length),
                dst.data_in(offset, min(length, dst_size - offset)) if dst is not None else [],
                offset,
                block_size,
                length,
            )
        if not segments:  # holes on both sides: nothing to read
            return Chunk(offset, length, [], ZEROS[:length], 0, [])
        if not hasattr(local, "a"):  # per thread: two pieces that stay in the CPU cache
            local.a, local.b = fresh_buffer(piece), fresh_buffer(piece)
        out = buf[:length]  # receives SRC's bytes of the changed blocks only
        read = 0
        runs: list[Run] = []
        old: list[bytearray] = []
        for rel, n in segments:
            for p in range(rel, rel + n, piece):
                m = min(piece, rel + n - p)
                a, b = local.a[:m], local.b[:m]
                read += read_src(a, offset + p)
                inside = max(0, min(m, dst_size - offset - p)) if dst is not None else 0
                if inside:
                    assert dst is not None
                    read += read_dst(b[:inside], offset + p)
                if inside < m:
                    b[inside:] = ZEROS[: m - inside]
                found = diff_runs(a, b, block_size)  # memcmp, zero test and coalescing in one call
                if not found:
                    continue
                base = p // block_size
                for b0, b1, z in found:
                    lo, hi = b0 * block_size, min(b1 * block_size, m)
                    if not z:
                        out[p + lo : p + hi] = a[lo:hi]
                    if runs and runs[-1][1] == b0 + base and runs[-1][2] == z:
                        runs[-1] = (runs[-1][0], b1 + base, z)  # continues the last run
                        if keep_old:
                            old[-1] += b[lo:hi]
                    else:
                        runs.append((b0 + base, b1 + base, z))
                        if keep_old:
                            old.append(bytearray(b[lo:hi]))
        return Chunk(offset, length, runs, out, read, old)

    def offsets() -> Iterator[int]:
        offset = start
        while offset < end and not (stop is not None and stop.is_set()):
            if regions is not None:
                while offset < end and not regions(offset, min(CHUNK_SIZE, end - offset)):
                    offset += CHUNK_SIZE
            else:
                offset = _skip_holes(src, dst, dst_size, offset, end)
            if offset >= end:
                return
            yield offset
            offset += CHUNK_SIZE

    return in_order(work, offsets(), workers, 2 * workers, buffers=True, guards=guards)


def _skip_holes(src: Image, dst: Image | None, dst_size: int, offset: int, end: int) -> int:
    """Jump over whole chunks that are holes on both sides (a mostly empty 64 GiB image is 8192 chunks)."""
    nd = src.next_data(offset)
    if dst is not None and offset < dst_size:
        nd = min(nd, dst.next_data(offset))
    if nd >= end:
        return end
    return offset + (nd - offset) // CHUNK_SIZE * CHUNK_SIZE
