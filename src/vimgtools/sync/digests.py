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
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from vimgtools.blocks import coalesce_runs, digest_blocks, hash_blocks, zero_blocks
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


def digests_of(view: memoryview, bs: int, checksum: str, key: bytes) -> npt.NDArray[np.uint64]:
    """One 128-bit digest per block: (n, 2) uint64. XXH3-128 seeded, or keyed BLAKE2b."""
    if checksum == "xxh128":
        return hash_blocks(view, bs, "xxh128", int.from_bytes(key[:8], "little"))
    import hashlib  # here: only --checksum blake2b pays for OpenSSL's start-up (3-4 ms a run)

    out = bytearray()
    for i in range(0, len(view), bs):  # hashlib releases the GIL on each block
        out += hashlib.blake2b(view[i : i + bs], digest_size=DIGEST_BYTES, key=key).digest()
    return np.frombuffer(bytes(out), dtype=np.uint64).reshape(-1, 2)


def _digest_piece(
    view: memoryview,
    bs: int,
    checksum: str,
    key: bytes,
    digests: npt.NDArray[np.uint64],
    zero: npt.NDArray[np.bool_],
    against: npt.NDArray[np.uint64] | None,
) -> npt.NDArray[np.int64]:
    """Fill ``digests`` and ``zero`` for the blocks of ``view``; the non-zero ones differing from ``against``."""
    if checksum == "xxh128":  # one native call, GIL released
        return digest_blocks(view, bs, int.from_bytes(key[:8], "little"), digests, zero, against)
    digests[:] = digests_of(view, bs, checksum, key)
    zero[:] = zero_blocks(view, bs)
    if against is None:
        return np.empty(0, dtype=np.int64)
    return np.flatnonzero((digests != against).any(axis=1) & ~zero)


@functools.lru_cache(maxsize=16)
def _zero_digest(length: int, bs: int, checksum: str, key: bytes) -> bytes:
    return digests_of(ZEROS[:length], bs, checksum, key).tobytes()


def hole_digests(length: int, bs: int, checksum: str, key: bytes) -> npt.NDArray[np.uint64]:
    """Digests of ``length`` zero bytes, computed from one block instead of hashing them all."""
    n = -(-length // bs)
    out = np.tile(np.frombuffer(_zero_digest(bs, bs, checksum, key), dtype=np.uint64), (n, 1))
    if length % bs:
        out[-1] = np.frombuffer(_zero_digest(length % bs, bs, checksum, key), dtype=np.uint64)
    return out


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
) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.bool_] | None, int]:
    """Digests of one chunk of ``img``, its zero-block mask (None for a hole) and the bytes read.

    With ``regions`` only their blocks are read; the others get a hole's digests on both ends."""
    digests, zero, read = hole_digests(length, bs, checksum, key), None, 0
    for p, view, n in pieces(img, offset, length, bs, keep_cache, size, cached_only, guard, regions):
        if zero is None:
            zero = np.ones(len(digests), dtype=np.bool_)
        b0, b1 = p // bs, -(-(p + len(view)) // bs)
        _digest_piece(view, bs, checksum, key, digests[b0:b1], zero[b0:b1], None)
        read += n
    return digests, zero, read


@dataclass
class Changes:
    """What differs in one chunk, as byte ranges of the image, and our digests of all its blocks."""

    offset: int
    length: int
    digests: npt.NDArray[np.uint64]
    ranges: list[tuple[int, int, memoryview | None]]  # (offset, length, bytes; None: now zeros)
    changed: int  # blocks
    zero: int  # blocks of them that are now zeros
    read: int

    def detach(self) -> Changes:
        """The same, with bytes of its own (``ranges`` point into a reused buffer until then)."""
        own = [(o, n, None if b is None else memoryview(bytes(b))) for o, n, b in self.ranges]
        return Changes(self.offset, self.length, self.digests, own, self.changed, self.zero, self.read)


Theirs = Callable[[int, int], "npt.NDArray[np.uint64] | None"]


def chunk_changes(
    img: Image,
    offset: int,
    length: int,
    bs: int,
    checksum: str,
    key: bytes,
    theirs: npt.NDArray[np.uint64] | None,
    out: memoryview,
    keep_cache: bool = False,
    guard: CacheGuard | None = None,
    regions: Regions | None = None,
) -> Changes:
    """Hash a chunk of ``img`` and compare with ``theirs`` (None: the other side is a hole there).

    Only the bytes of changed, non-zero blocks are copied into ``out`` (at their chunk position),
    while they are still in the CPU cache; the result's ranges point there.
    """
    mine = hole_digests(length, bs, checksum, key)
    other = hole_digests(length, bs, checksum, key) if theirs is None else theirs
    zero = np.ones(len(mine), dtype=np.bool_)
    read, hole = 0, True
    for p, view, n in pieces(img, offset, length, bs, keep_cache, None, guard=guard, regions=regions):
        b0, b1 = p // bs, -(-(p + len(view)) // bs)
        read, hole = read + n, False
        found = _digest_piece(view, bs, checksum, key, mine[b0:b1], zero[b0:b1], other[b0:b1])
        for c0, c1, _ in coalesce_runs(found, np.zeros(len(found), dtype=np.bool_)):
            lo, hi = c0 * bs, min(c1 * bs, len(view))
            out[p + lo : p + hi] = view[lo:hi]
    if hole and theirs is None:  # a hole on both sides
        return Changes(offset, length, mine, [], 0, 0, 0)
    changed = np.flatnonzero((mine != other).any(axis=1)).astype(np.int64)
    return _changes(offset, length, bs, mine, changed, zero, read, lambda lo, hi: out[lo:hi])


def _changes(
    offset: int,
    length: int,
    bs: int,
    digests: npt.NDArray[np.uint64],
    changed: npt.NDArray[np.int64],
    zero: npt.NDArray[np.bool_],
    read: int,
    payload: Callable[[int, int], memoryview],
) -> Changes:
    """``Changes`` of a chunk from its changed blocks; ``payload(lo, hi)`` gives the bytes of a data run."""
    ranges: list[tuple[int, int, memoryview | None]] = []
    nzero = 0
    for b0, b1, is_zero in coalesce_runs(changed, zero[changed]):
        lo, hi = b0 * bs, min(b1 * bs, length)
        ranges.append((offset + lo, hi - lo, None if is_zero else payload(lo, hi)))
        nzero += (b1 - b0) if is_zero else 0
    return Changes(offset, length, digests, ranges, len(changed), nzero, read)


@dataclass
class Hashed:
    """A chunk hashed ahead of the comparison, without its bytes (``changes_of`` reads them again)."""

    offset: int
    length: int
    digests: npt.NDArray[np.uint64]
    zero: npt.NDArray[np.bool_] | None  # None: a hole
    read: int


def changes_of(
    img: Image, h: Hashed, theirs: npt.NDArray[np.uint64] | None, bs: int, out: memoryview, keep_cache: bool
) -> Changes:
    """Compare a chunk hashed earlier with ``theirs``, reading the changed non-zero blocks again into ``out``."""
    if h.zero is None and theirs is None:  # a hole on both sides
        return Changes(h.offset, h.length, h.digests, [], 0, 0, h.read)
    zero = np.ones(len(h.digests), dtype=np.bool_) if h.zero is None else h.zero
    if theirs is None:  # the other side is a hole: all we have that is not zero
        changed = np.flatnonzero(~zero).astype(np.int64)
    else:
        changed = np.flatnonzero((h.digests != theirs).any(axis=1)).astype(np.int64)
    again = [0]

    def read_again(lo: int, hi: int) -> memoryview:
        again[0] += read_piece(img, out[lo:hi], h.offset + lo, keep_cache)
        return out[lo:hi]

    c = _changes(h.offset, h.length, bs, h.digests, changed, zero, h.read, read_again)
    c.read += again[0]
    return c


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
            held += h.digests.nbytes
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
        self._got: dict[int, npt.NDArray[np.uint64] | None] = {}
        self._lock = threading.Lock()

    def __call__(self, offset: int, length: int) -> npt.NDArray[np.uint64] | None:
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
) -> Generator[tuple[int, int, npt.NDArray[np.uint64], npt.NDArray[np.bool_] | None, int], None, None]:
    """(offset, length, digests, zero mask or None for a hole, bytes read) of each chunk, in order.

    With ``regions`` only their blocks are read, and read ahead."""
    guard = CacheGuard(img, end if size is None else min(end, size), keep_cache, regions=regions)

    def work(
        offset: int, _: memoryview
    ) -> tuple[int, int, npt.NDArray[np.uint64], npt.NDArray[np.bool_] | None, int]:
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
