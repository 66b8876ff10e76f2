"""Block digests for comparing images that are not side by side (remote sync, signatures, state).

128 bits a block: XXH3-128 seeded from a per-session random key (fast; collisions
cannot be prepared without the key), or keyed BLAKE2b (for replicas of guests
whose owners are not trusted). Holes are never hashed: their digests come from
one block of zeros.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Generator
from typing import NamedTuple

from vimgtools.blocks import diff_runs, digest_into, digest_runs
from vimgtools.image import Image
from vimgtools.sync.chunks import (
    CHUNK_SIZE,
    ZEROS,
    CacheGuard,
    NotCached,
    Regions,
    in_order,
    pieces,
    read_piece,
)

CHECKSUMS = ("xxh128", "blake2b")
DIGEST_BYTES = 16
# A chunk's digests: DIGEST_BYTES a block (XXH3-128 low64, high64, little-endian; or BLAKE2b-128),
# as signatures and the wire hold them. Zero flags: one byte a block, 1 for all zeros.
Digests = bytes | bytearray | memoryview


def _seed(key: bytes) -> int:
    return int.from_bytes(key[:8], "little")


def digests_of(view: memoryview, bs: int, checksum: str, key: bytes) -> bytes:
    """One 128-bit digest per block: XXH3-128 seeded, or keyed BLAKE2b."""
    if checksum == "xxh128":
        count = -(-len(view) // bs)
        out = bytearray(count * DIGEST_BYTES)
        digest_into(view, bs, _seed(key), out, bytearray(count))
        return bytes(out)
    import hashlib  # here: only --checksum blake2b pays for OpenSSL's start-up (3-4 ms a run)

    out = bytearray()
    for i in range(0, len(view), bs):  # hashlib releases the GIL on each block
        out += hashlib.blake2b(view[i : i + bs], digest_size=DIGEST_BYTES, key=key).digest()
    return bytes(out)


def _digest_piece(
    view: memoryview,
    bs: int,
    checksum: str,
    key: bytes,
    digests: memoryview,
    zero: memoryview,
    against: memoryview | None,
) -> list[tuple[int, int]]:
    """Fill ``digests`` and ``zero`` for the blocks of ``view``; the runs of non-zero ones differing from ``against``."""
    if checksum == "xxh128":  # one native call, GIL released: hash, zero test, compare, runs
        found: list[tuple[int, int]] = digest_into(view, bs, _seed(key), digests, zero, against)
        return found
    digests[:] = digests_of(view, bs, checksum, key)
    flags = bytearray(b"\x01") * len(zero)
    for b0, b1, _ in diff_runs(view, ZEROS[: len(view)], bs):  # the blocks that are not zeros
        flags[b0:b1] = bytes(b1 - b0)
    zero[:] = flags
    if against is None:
        return []
    return [(b0, b1) for b0, b1, z in digest_runs(digests, against, zero) if not z]


@functools.lru_cache(maxsize=16)
def _zero_digest(length: int, bs: int, checksum: str, key: bytes) -> bytes:
    return digests_of(ZEROS[:length], bs, checksum, key)


def hole_digests(length: int, bs: int, checksum: str, key: bytes) -> bytes:
    """Digests of ``length`` zero bytes, computed from one block instead of hashing them all."""
    n, tail = -(-length // bs), length % bs
    if not tail:
        return _zero_digest(bs, bs, checksum, key) * n
    return _zero_digest(bs, bs, checksum, key) * (n - 1) + _zero_digest(tail, bs, checksum, key)


def _nonzero_runs(zero: Digests) -> list[tuple[int, int, bool]]:
    """Runs of the blocks whose zero flag is 0 (one ``find`` per run, not a loop per block)."""
    flags, runs, i = bytes(zero), [], 0
    while (j := flags.find(0, i)) >= 0:
        k = flags.find(1, j)
        k = len(flags) if k < 0 else k
        runs.append((j, k, False))
        i = k
    return runs


def hash_chunk(
    img: Image,
    offset: int,
    length: int,
    bs: int,
    checksum: str,
    key: bytes,
    keep_cache: bool = False,
    size: int | None = None,
    cached_only: bool = False,
    guard: CacheGuard | None = None,
    regions: Regions | None = None,
) -> tuple[bytearray, bytearray | None, int]:
    """Digests of one chunk of ``img``, its zero flags (None for a hole) and the bytes read.

    With ``regions`` only their blocks are read; the others get a hole's digests on both ends."""
    digests, zero, read = bytearray(hole_digests(length, bs, checksum, key)), None, 0
    dv = memoryview(digests)
    zv = memoryview(b"")
    for p, view, n in pieces(img, offset, length, bs, keep_cache, size, cached_only, guard, regions):
        if zero is None:
            zero = bytearray(b"\x01") * (len(digests) // DIGEST_BYTES)
            zv = memoryview(zero)
        b0, b1 = p // bs, -(-(p + len(view)) // bs)
        _digest_piece(view, bs, checksum, key, dv[b0 * DIGEST_BYTES : b1 * DIGEST_BYTES], zv[b0:b1], None)
        read += n
    return digests, zero, read


class Changes(NamedTuple):
    """What differs in one chunk, as byte ranges of the image, and our digests of all its blocks."""

    offset: int
    length: int
    digests: Digests
    ranges: list[tuple[int, int, memoryview | None]]  # (offset, length, bytes; None: now zeros)
    changed: int  # blocks
    zero: int  # blocks of them that are now zeros
    read: int

    def detach(self) -> Changes:
        """The same, with bytes of its own (``ranges`` point into a reused buffer until then)."""
        own = [(o, n, None if b is None else memoryview(bytes(b))) for o, n, b in self.ranges]
        return Changes(self.offset, self.length, self.digests, own, self.changed, self.zero, self.read)


Theirs = Callable[[int, int], "Digests | None"]


def chunk_changes(
    img: Image,
    offset: int,
    length: int,
    bs: int,
    checksum: str,
    key: bytes,
    theirs: Digests | None,
    out: memoryview,
    keep_cache: bool = False,
    guard: CacheGuard | None = None,
    regions: Regions | None = None,
) -> Changes:
    """Hash a chunk of ``img`` and compare with ``theirs`` (None: the other side is a hole there).

    Only the bytes of changed, non-zero blocks are copied into ``out`` (at their chunk position),
    while they are still in the CPU cache; the result's ranges point there.
    """
    holes = hole_digests(length, bs, checksum, key)
    mine = bytearray(holes)
    other = holes if theirs is None else theirs
    zero = bytearray(b"\x01") * (len(mine) // DIGEST_BYTES)
    mv, zv, ov = memoryview(mine), memoryview(zero), memoryview(other).cast("B")
    read, hole = 0, True
    for p, view, n in pieces(img, offset, length, bs, keep_cache, None, guard=guard, regions=regions):
        b0, b1 = p // bs, -(-(p + len(view)) // bs)
        read, hole = read + n, False
        d0, d1 = b0 * DIGEST_BYTES, b1 * DIGEST_BYTES
        for c0, c1 in _digest_piece(view, bs, checksum, key, mv[d0:d1], zv[b0:b1], ov[d0:d1]):
            lo, hi = c0 * bs, min(c1 * bs, len(view))
            out[p + lo : p + hi] = view[lo:hi]
    if hole and theirs is None:  # a hole on both sides
        return Changes(offset, length, mine, [], 0, 0, 0)
    runs = digest_runs(mine, ov, zero)
    return _changes(offset, length, bs, mine, runs, read, lambda lo, hi: out[lo:hi])


def _changes(
    offset: int,
    length: int,
    bs: int,
    digests: Digests,
    runs: list[tuple[int, int, bool]],
    read: int,
    payload: Callable[[int, int], memoryview],
) -> Changes:
    """``Changes`` of a chunk from its changed runs; ``payload(lo, hi)`` gives the bytes of a data run."""
    ranges: list[tuple[int, int, memoryview | None]] = []
    changed = nzero = 0
    for b0, b1, is_zero in runs:
        lo, hi = b0 * bs, min(b1 * bs, length)
        ranges.append((offset + lo, hi - lo, None if is_zero else payload(lo, hi)))
        changed += b1 - b0
        nzero += (b1 - b0) if is_zero else 0
    return Changes(offset, length, digests, ranges, changed, nzero, read)


class Hashed(NamedTuple):
    """A chunk hashed ahead of the comparison, without its bytes (``changes_of`` reads them again)."""

    offset: int
    length: int
    digests: Digests
    zero: Digests | None  # None: a hole
    read: int


def changes_of(
    img: Image, h: Hashed, theirs: Digests | None, bs: int, out: memoryview, keep_cache: bool
) -> Changes:
    """Compare a chunk hashed earlier with ``theirs``, reading the changed non-zero blocks again into ``out``."""
    if h.zero is None and theirs is None:  # a hole on both sides
        return Changes(h.offset, h.length, h.digests, [], 0, 0, h.read)
    zero = bytearray(b"\x01") * (len(h.digests) // DIGEST_BYTES) if h.zero is None else h.zero
    # the other side a hole: all we have that is not zero
    runs = _nonzero_runs(zero) if theirs is None else digest_runs(h.digests, theirs, zero)
    again = [0]

    def read_again(lo: int, hi: int) -> memoryview:
        again[0] += read_piece(img, out[lo:hi], h.offset + lo, keep_cache)
        return out[lo:hi]

    c = _changes(h.offset, h.length, bs, h.digests, runs, h.read, read_again)
    return c._replace(read=c.read + again[0])


def hash_ahead(
    img: Image,
    start: int,
    end: int,
    bs: int,
    checksum: str,
    key: bytes,
    *,
    stop_when: Callable[[], bool],
    limit: int,
    keep_cache: bool = False,
    workers: int = 2,
    regions: Regions | None = None,
) -> list[Hashed]:
    """Hash the chunks from ``start`` on until ``stop_when()``, while they come from the page cache.

    For a sender waiting for its peer: bytes are not kept, and a chunk that is not all in the
    page cache ends the work (reading its changed blocks again later must not go to the disk).
    At most ``limit`` bytes of digests are held.
    """
    guard = CacheGuard(img, end, keep_cache, fetch=False)  # nothing is read from the disk here

    def work(offset: int, _: memoryview) -> Hashed | None:
        length = min(CHUNK_SIZE, end - offset)
        try:
            return Hashed(
                offset,
                length,
                *hash_chunk(img, offset, length, bs, checksum, key, keep_cache, None, True, guard, regions),
            )
        except NotCached:
            return None

    found: list[Hashed] = []
    held = 0
    stream = in_order(
        work, range(start, end, CHUNK_SIZE), workers, 2 * workers, buffers=False, guards=[guard]
    )
    try:
        for h in stream:
            if h is None:
                break
            found.append(h)
            held += len(h.digests)
            if held >= limit or stop_when():
                break
    finally:
        stream.close()
    return found


class InOrder:
    """Makes ``fetch(offset, length)`` (a stream read in order) callable from threads in any order.

    The caller asks for each chunk of [start, end) exactly once.
    """

    def __init__(self, fetch: Theirs, start: int, end: int) -> None:
        self._fetch, self._next, self._end = fetch, start, end
        self._got: dict[int, Digests | None] = {}
        self._lock = threading.Lock()

    def __call__(self, offset: int, length: int) -> Digests | None:
        with self._lock:
            while self._next <= offset:
                n = min(CHUNK_SIZE, self._end - self._next)
                self._got[self._next] = self._fetch(self._next, n)
                self._next += n
            return self._got.pop(offset)


def digest_stream(
    img: Image,
    start: int,
    end: int,
    bs: int,
    checksum: str,
    key: bytes,
    *,
    keep_cache: bool = False,
    size: int | None = None,
    workers: int = 2,
    regions: Regions | None = None,
) -> Generator[tuple[int, int, bytearray, bytearray | None, int], None, None]:
    """(offset, length, digests, zero flags or None for a hole, bytes read) of each chunk, in order.

    With ``regions`` only their blocks are read, and read ahead."""
    guard = CacheGuard(img, end if size is None else min(end, size), keep_cache, regions=regions)

    def work(offset: int, _: memoryview) -> tuple[int, int, bytearray, bytearray | None, int]:
        length = min(CHUNK_SIZE, end - offset)
        return (
            offset,
            length,
            *hash_chunk(
                img, offset, length, bs, checksum, key, keep_cache, size, guard=guard, regions=regions
            ),
        )

    return in_order(work, range(start, end, CHUNK_SIZE), workers, 2 * workers, buffers=False, guards=[guard])


def change_stream(
    img: Image,
    start: int,
    end: int,
    bs: int,
    checksum: str,
    key: bytes,
    theirs: Theirs,
    *,
    keep_cache: bool = False,
    workers: int = 2,
    regions: Regions | None = None,
) -> Generator[Changes, None, None]:
    """``chunk_changes`` of each chunk of [start, end), in order; ``theirs`` is asked chunk by chunk, in order."""
    guard = CacheGuard(img, end, keep_cache, regions=regions)
    other = InOrder(theirs, start, end)

    def work(offset: int, out: memoryview) -> Changes:
        length = min(CHUNK_SIZE, end - offset)
        theirs = other(offset, length)
        return chunk_changes(img, offset, length, bs, checksum, key, theirs, out, keep_cache, guard, regions)

    return in_order(work, range(start, end, CHUNK_SIZE), workers, 2 * workers, buffers=True, guards=[guard])
