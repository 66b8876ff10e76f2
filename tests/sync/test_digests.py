"""Chunk digests read and hashed a piece at a time, on threads, equal the plain computation.

The reference reads a chunk's bytes whole (zeros past the compared size) and hashes
them with ``digests_of``; the pipeline reads only data extents, in ``PIECE``-sized pieces,
on two threads. Real sparse files: holes inside a piece, across pieces and chunks,
a short last block, a compared size that cuts a block.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from synchelp import MiB, poke, write_image

from vimgtools.blocks import coalesce_runs, zero_blocks
from vimgtools.image import Image
from vimgtools.sync.chunks import CHUNK_SIZE
from vimgtools.sync.digests import (
    change_stream,
    changes_of,
    chunk_changes,
    digest_stream,
    digests_of,
    hash_ahead,
    hash_chunk,
)

KEY = bytes(range(32))
SIZE = 2 * CHUNK_SIZE + 5 * MiB + 4097  # three chunks, the last one ends in a short block
EXTENTS = [
    (0, 3000),
    (300_000, MiB),
    (CHUNK_SIZE - 4096, 8192),
    (CHUNK_SIZE + 3 * MiB, 4 * MiB),
    (SIZE - 5000, 5000),
]


def reference(path: Path, offset: int, length: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(max(0, min(length, size - offset)))
    return data + bytes(length - len(data))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("digests")
    new = write_image(d / "new.img", SIZE, EXTENTS, seed=1)
    old = write_image(d / "old.img", SIZE, EXTENTS[:3], seed=1)  # same start, then differs
    poke(old, 400_000, b"x" * 10)  # one block inside an extent both have
    poke(new, CHUNK_SIZE + 6 * MiB, bytes(65536))  # zeros written (allocated) into new
    return new, old


@pytest.mark.parametrize("checksum", ["xxh128", "blake2b"])
@pytest.mark.parametrize("bs", [4096, 65536, 8 * MiB])
@pytest.mark.parametrize("size", [None, SIZE - 4097, CHUNK_SIZE + 100])
def test_chunk_digests_equal_whole_chunk_hashing(
    images: tuple[Path, Path], checksum: str, bs: int, size: int | None
) -> None:
    new, _ = images
    limit = SIZE if size is None else size
    with Image(new) as img:
        for offset in range(0, SIZE, CHUNK_SIZE):
            length = min(CHUNK_SIZE, SIZE - offset)
            want = reference(new, offset, length, limit)
            digests, zero, read = hash_chunk(img, offset, length, bs, checksum, KEY, size=size)
            assert bytes(digests) == digests_of(memoryview(want), bs, checksum, KEY)
            if zero is None:
                assert read == 0 and not any(want)
            else:
                assert list(zero) == zero_blocks(want, bs).tolist()  # one byte a block, 1: all zeros
                assert 0 < read <= length


def test_a_chunk_past_the_compared_size_is_a_hole(images: tuple[Path, Path]) -> None:
    with Image(images[0]) as img:
        digests, zero, read = hash_chunk(img, CHUNK_SIZE, CHUNK_SIZE, 65536, "xxh128", KEY, size=CHUNK_SIZE)
    assert zero is None and read == 0
    assert bytes(digests) == digests_of(memoryview(bytes(CHUNK_SIZE)), 65536, "xxh128", KEY)


@pytest.mark.parametrize("bs", [4096, 65536])
@pytest.mark.parametrize("against", ["old", "hole"])
def test_chunk_changes_are_the_blocks_that_differ(images: tuple[Path, Path], bs: int, against: str) -> None:
    new, old = images
    out = memoryview(bytearray(CHUNK_SIZE))
    with Image(new) as img:
        for offset in range(0, SIZE, CHUNK_SIZE):
            length = min(CHUNK_SIZE, SIZE - offset)
            mine = reference(new, offset, length, SIZE)
            theirs_bytes = reference(old, offset, length, SIZE) if against == "old" else bytes(length)
            theirs = digests_of(memoryview(theirs_bytes), bs, "xxh128", KEY) if against == "old" else None
            c = chunk_changes(img, offset, length, bs, "xxh128", KEY, theirs, out)
            a, b = np.frombuffer(mine, np.uint8), np.frombuffer(theirs_bytes, np.uint8)
            n = -(-length // bs)
            differs = [
                i for i in range(n) if not np.array_equal(a[i * bs : (i + 1) * bs], b[i * bs : (i + 1) * bs])
            ]
            z = zero_blocks(mine, bs)
            want = [
                (offset + b0 * bs, min(b1 * bs, length) - b0 * bs, is_zero)
                for b0, b1, is_zero in coalesce_runs(np.array(differs, dtype=np.int64), z[differs])
            ]
            assert [(o, m, p is None) for o, m, p in c.ranges] == want
            for o, m, p in c.ranges:
                if p is not None:
                    assert bytes(p) == mine[o - offset : o - offset + m]
            assert c.changed == sum(-(-m // bs) for _, m, _ in want)
            assert bytes(c.digests) == digests_of(memoryview(mine), bs, "xxh128", KEY)


@pytest.mark.parametrize("workers", [1, 2])
def test_streams_yield_every_chunk_in_order(images: tuple[Path, Path], workers: int) -> None:
    new, old = images
    asked: list[int] = []
    with Image(old) as o:
        theirs = {
            off: d for off, _, d, _, _ in digest_stream(o, 0, SIZE, 65536, "xxh128", KEY, workers=workers)
        }

    def fetch(offset: int, length: int) -> bytes | bytearray | memoryview:
        asked.append(offset)
        return theirs[offset]

    with Image(new) as img:
        got = [c.detach() for c in change_stream(img, 0, SIZE, 65536, "xxh128", KEY, fetch, workers=workers)]
    assert [c.offset for c in got] == asked == list(range(0, SIZE, CHUNK_SIZE))
    # Applying the changes to the old bytes gives the new ones.
    rebuilt = bytearray(reference(old, 0, SIZE, SIZE))
    for c in got:
        for off, n, payload in c.ranges:
            rebuilt[off : off + n] = bytes(n) if payload is None else payload
    assert bytes(rebuilt) == reference(new, 0, SIZE, SIZE)


@pytest.mark.parametrize("against", ["old", "hole"])
def test_changes_of_a_chunk_hashed_ahead_equal_chunk_changes(images: tuple[Path, Path], against: str) -> None:
    """Hashed while the peer connects, bytes read again afterwards: the same changes as in one go."""
    new, old = images
    bs = 4096
    with Image(new) as img, Image(old) as o:
        ahead = hash_ahead(img, 0, SIZE, bs, "xxh128", KEY, stop_when=lambda: False, limit=1 << 30)
        assert [h.offset for h in ahead] == list(range(0, SIZE, CHUNK_SIZE))  # all cached: just written
        for h in ahead:
            theirs = hash_chunk(o, h.offset, h.length, bs, "xxh128", KEY)[0] if against == "old" else None
            a = chunk_changes(
                img, h.offset, h.length, bs, "xxh128", KEY, theirs, memoryview(bytearray(CHUNK_SIZE))
            )
            b = changes_of(img, h, theirs, bs, memoryview(bytearray(CHUNK_SIZE)), False)
            assert [(o_, n, None if p is None else bytes(p)) for o_, n, p in a.ranges] == [
                (o_, n, None if p is None else bytes(p)) for o_, n, p in b.ranges
            ]
            assert (a.changed, a.zero) == (b.changed, b.zero)
            assert bytes(a.digests) == bytes(b.digests)


def test_hash_ahead_stops_when_asked_and_at_uncached_data(images: tuple[Path, Path], tmp_path: Path) -> None:
    new, _ = images
    with Image(new) as img:
        calls = []
        got = hash_ahead(
            img, 0, SIZE, 65536, "xxh128", KEY, stop_when=lambda: bool(calls.append(1)) or True, limit=1 << 30
        )
        assert len(got) == 1 and len(calls) == 1
        assert len(hash_ahead(img, 0, SIZE, 65536, "xxh128", KEY, stop_when=lambda: False, limit=1)) == 1
    cold = tmp_path / "cold.img"
    cold.write_bytes(new.read_bytes())
    fd = os.open(cold, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean pages: really dropped
    finally:
        os.close(fd)
    with Image(cold) as img:
        if img.read_into(memoryview(bytearray(4096)), 0)[1]:
            pytest.skip(f"{cold}: the page cache kept the pages (cannot make them cold here)")
        assert hash_ahead(img, 0, SIZE, 65536, "xxh128", KEY, stop_when=lambda: False, limit=1 << 30) == []
