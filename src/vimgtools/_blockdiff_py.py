"""Plain-Python twin of the native engine: same signatures, same errors.

The tests' reference and the reader's explanation; never used on a hot path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import xxhash

if TYPE_CHECKING:
    from typing_extensions import Buffer

MIN_BLOCK_SIZE = 4096
MAX_BLOCK_SIZE = 16 * 1024 * 1024
ALGORITHMS = ("xxh128", "xxh64")
XXH3_DISPATCH = False  # python-xxhash picks its own vector code; the digests are the same


def _check_block_size(block_size: int) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size must be an int, not {type(block_size).__name__}")
    if not (MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE) or block_size & (block_size - 1):
        raise ValueError(
            f"block_size {block_size} is not allowed: use a power of two "
            f"from 4096 (4 KiB) to 16777216 (16 MiB)"
        )
    return block_size


def _bytes(buf: Buffer) -> bytes:
    m = memoryview(buf)
    if not m.c_contiguous:
        raise ValueError("buffer must be C-contiguous")
    if m.nbytes == 0:
        return b""  # memoryview.cast refuses shapes with a zero in them, e.g. numpy (0, 5)
    return m.cast("B").tobytes() if m.format != "B" or m.ndim != 1 else m.tobytes()


def hash_blocks(
    buf: Buffer, block_size: int, algorithm: str = "xxh128", seed: int = 0
) -> npt.NDArray[np.uint64]:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, not {type(seed).__name__}")
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed {seed} is out of range: use 0 <= seed < 2**64")
    bs = _check_block_size(block_size)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}: known are {', '.join(ALGORITHMS)}")
    data = _bytes(buf)
    blocks = [data[i : i + bs] for i in range(0, len(data), bs)]
    if algorithm == "xxh128":
        rows = []
        for b in blocks:
            d = xxhash.xxh3_128_intdigest(b, seed)
            rows.append((d & (2**64 - 1), d >> 64))
        return np.array(rows, dtype=np.uint64).reshape(len(blocks), 2)
    return np.array([xxhash.xxh3_64_intdigest(b, seed) for b in blocks], dtype=np.uint64)


def diff_blocks(a: Buffer, b: Buffer, block_size: int) -> npt.NDArray[np.int64]:
    bs = _check_block_size(block_size)
    x, y = _bytes(a), _bytes(b)
    if len(x) != len(y):
        raise ValueError(f"buffers differ in length: {len(x)} and {len(y)} bytes")
    return np.array([i // bs for i in range(0, len(x), bs) if x[i : i + bs] != y[i : i + bs]], dtype=np.int64)


def zero_blocks(buf: Buffer, block_size: int) -> npt.NDArray[np.bool_]:
    bs = _check_block_size(block_size)
    data = _bytes(buf)
    return np.array([not any(data[i : i + bs]) for i in range(0, len(data), bs)], dtype=np.bool_)


def digest_blocks(
    buf: Buffer,
    block_size: int,
    seed: int,
    digests: npt.NDArray[np.uint64],
    zero: npt.NDArray[np.bool_],
    against: npt.NDArray[np.uint64] | None = None,
) -> npt.NDArray[np.int64]:
    rows = hash_blocks(buf, block_size, "xxh128", seed)
    count = len(rows)
    if not isinstance(digests, np.ndarray) or digests.dtype != np.uint64 or digests.shape != (count, 2):
        raise ValueError(f"digests must be a uint64 array of shape ({count}, 2)")
    if not isinstance(zero, np.ndarray) or zero.dtype != np.bool_ or zero.shape != (count,):
        raise ValueError(f"zero must be a bool array of shape ({count},)")
    digests[:] = rows
    zero[:] = zero_blocks(buf, block_size)
    if against is None:
        return np.empty(0, dtype=np.int64)
    if not isinstance(against, np.ndarray) or against.dtype != np.uint64 or against.shape != (count, 2):
        raise ValueError(f"against must be a uint64 array of shape ({count}, 2)")
    return np.flatnonzero((rows != against).any(axis=1) & ~zero).astype(np.int64)
