#!/usr/bin/env python3
"""`make demo`: the block engine on a sample sparse image (a real sync demo comes later).

Makes a sparse source image and an identical replica in a temporary directory,
changes some blocks of the source (overwritten, zeroed, written into a hole),
then reads both images once in large chunks and shows, with the engine, which
blocks differ, how many bytes a sync would send and which runs become holes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from vimgtools import diff_blocks, hash_blocks, zero_blocks
from vimgtools._cli import parse_size
from vimgtools.blocks import changed_runs

CHUNK = 16 << 20  # bytes read per call: large sequential reads into reused buffers


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def make_images(d: Path, size: int, rng: np.random.Generator) -> tuple[Path, Path]:
    """A sparse image with a few data extents, and a replica with the same content."""
    src, dst = d / "source.img", d / "replica.img"
    extents = [
        (0, 2 << 20),
        (size // 4, 4 << 20),
        (size // 2 + (1 << 20), 3 << 20),
        (size - (1 << 20), 1 << 20),
    ]
    for path in (src, dst):
        with path.open("wb") as f:
            f.truncate(size)
    for offset, length in extents:
        data = rng.bytes(length)
        for path in (src, dst):
            with path.open("r+b") as f:
                f.seek(offset)
                f.write(data)
    return src, dst


def change_blocks(src: Path, size: int, block_size: int, rng: np.random.Generator) -> list[str]:
    """Change the source in the ways a running guest does; returns what was done."""
    n = size // block_size
    edits = [
        ("overwrote 3 blocks", 5, 3, "random"),
        ("wrote 1 block into a hole", n // 8, 1, "random"),
        ("zeroed 2 blocks (discard)", (size // 4) // block_size + 1, 2, "zero"),
        ("changed 1 byte in the last block", n - 1, 1, "byte"),
    ]
    with src.open("r+b") as f:
        for _, first, count, kind in edits:
            f.seek(first * block_size)
            if kind == "random":
                f.write(rng.bytes(count * block_size))
            elif kind == "zero":
                f.write(bytes(count * block_size))
            else:
                f.seek(first * block_size + block_size - 1)
                old = os.pread(f.fileno(), 1, f.tell())
                f.write(bytes([old[0] ^ 0xFF]))
    return [what for what, *_ in edits]


def compare(src: Path, dst: Path, block_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Read both images once; return changed block indices, which of them are zero now, bytes read."""
    a, b = bytearray(CHUNK), bytearray(CHUNK)
    changed, zero = [], []
    done = 0
    with src.open("rb", buffering=0) as fs, dst.open("rb", buffering=0) as fd:
        while True:
            n = fs.readinto(a)
            m = fd.readinto(b)
            if not n:
                break
            assert n == m, "images differ in size"
            va, vb = memoryview(a)[:n], memoryview(b)[:n]
            idx = diff_blocks(va, vb, block_size)
            # What a remote sync compares instead of bytes: per-block digests.
            ha, hb = hash_blocks(va, block_size), hash_blocks(vb, block_size)
            assert np.array_equal(np.flatnonzero((ha != hb).any(axis=1)), idx), "digests disagree with bytes"
            changed.append(idx + done // block_size)
            zero.append(zero_blocks(va, block_size)[idx])
            done += n
    return np.concatenate(changed), np.concatenate(zero), 2 * done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=parse_size, default="256M", help="image size (default 256M)")
    p.add_argument("--block-size", type=parse_size, default="64K", help="block size (default 64K)")
    args = p.parse_args(argv)
    size, bs = args.size, args.block_size
    try:
        zero_blocks(b"", bs)  # the engine's own check and message for the block size
    except ValueError as e:
        p.error(str(e))
    if size % bs or size < 16 * bs:
        p.error("--size must be a multiple of --block-size and at least 16 blocks")
    rng = np.random.default_rng(42)
    with tempfile.TemporaryDirectory(prefix="vimg-demo-") as tmp:
        src, dst = make_images(Path(tmp), size, rng)
        allocated = os.stat(src).st_blocks * 512
        print(f"sample image: {src.name}, {human(size)} apparent, {human(allocated)} allocated (sparse)")
        print(f"replica:      {dst.name}, same content")
        for what in change_blocks(src, size, bs, rng):
            print(f"  source: {what}")
        t0 = time.perf_counter()
        idx, zero, nread = compare(src, dst, bs)
        seconds = time.perf_counter() - t0
    runs = changed_runs(idx, zero)
    data_blocks = int((~zero).sum())
    sent = data_blocks * bs
    print(
        f"compared {human(size)} in {bs // 1024} KiB blocks ({size // bs} blocks), "
        f"read {human(nread)} in {seconds:.2f} s"
    )
    print(f"differing blocks: {len(idx)} in {len(runs)} runs")
    for first, end, is_zero in runs:
        where = f"block {first}" if end - first == 1 else f"blocks {first}-{end - 1}"
        kind = "all zero now: punch a hole, send nothing" if is_zero else f"send {human((end - first) * bs)}"
        print(f"  {where:<18} {kind}")
    print(
        f"a sync would send {human(sent)} ({100 * sent / size:.3f}% of the image) "
        f"and punch {int(zero.sum())} block(s) of holes, instead of copying {human(size)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
