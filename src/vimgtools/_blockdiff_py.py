"""Plain-Python twin of the native engine: same signatures, same errors.

The tests' reference and the reader's explanation; never used on a hot path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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


def _runs(marks: list[int], kinds: bool) -> list[Any]:
    runs: list[Any] = []
    for i, m in enumerate(marks):
        if m and runs and runs[-1][1] == i and marks[i - 1] == m:
            runs[-1] = (runs[-1][0], i + 1, m == 2) if kinds else (runs[-1][0], i + 1)
        elif m:
            runs.append((i, i + 1, m == 2) if kinds else (i, i + 1))
    return runs


def checksum64(buf: Buffer) -> int:
    return int(xxhash.xxh3_64_intdigest(_bytes(buf), 0))


def digest_into(
    buf: Buffer, block_size: int, seed: int, digests: Buffer, zero: Buffer, against: Buffer | None = None
) -> list[tuple[int, int]]:
    rows = hash_blocks(buf, block_size, "xxh128", seed)
    flags = zero_blocks(buf, block_size)
    count = len(rows)
    out, z = memoryview(digests).cast("B"), memoryview(zero).cast("B")
    if out.readonly or z.readonly:
        raise TypeError(
            "digests must be a writable buffer" if out.readonly else "zero must be a writable buffer"
        )
    if len(out) < 16 * count or len(z) < count:
        raise ValueError("digests or zero too small")
    out[: 16 * count] = rows.tobytes()
    z[:count] = bytes(flags.astype(np.uint8))
    if against is None:
        return []
    other = _bytes(against)
    if len(other) < 16 * count:
        raise ValueError("against too small")
    theirs = np.frombuffer(other[: 16 * count], dtype=np.uint64).reshape(-1, 2)
    marks = [int(not flags[i] and bool((rows[i] != theirs[i]).any())) for i in range(count)]
    return _runs(marks, False)


def diff_runs(a: Buffer, b: Buffer, block_size: int) -> list[tuple[int, int, bool]]:
    bs = _check_block_size(block_size)
    x = _bytes(a)
    changed = set(diff_blocks(a, b, block_size).tolist())
    marks = [
        (2 if not any(x[i * bs : (i + 1) * bs]) else 1) if i in changed else 0
        for i in range(-(-len(x) // bs))
    ]
    return _runs(marks, True)


def digest_runs(mine: Buffer, theirs: Buffer, zero: Buffer) -> list[tuple[int, int, bool]]:
    x, y, z = _bytes(mine), _bytes(theirs), _bytes(zero)
    if len(x) != len(y) or len(x) % 16:
        raise ValueError(f"digests of different or odd lengths: {len(x)} and {len(y)} bytes")
    count = len(x) // 16
    marks = [
        (2 if z[i] else 1) if x[16 * i : 16 * i + 16] != y[16 * i : 16 * i + 16] else 0 for i in range(count)
    ]
    return _runs(marks, True)
