"""pytest-benchmark: each engine function on 64 MiB in memory, 64 KiB blocks, 1 and 2 threads.

Two threads means two different buffers processed at the same time, one per
thread (the GIL is released inside the engine). The python-xxhash loop, one call
per block, is the contrast the engine has to beat. Run with ``make bench``, or:

    .venv/bin/python -m pytest benchmarks --benchmark-enable --benchmark-only

Without ``--benchmark-enable`` (the default in pyproject.toml) each runs once, as a smoke test.
Each result carries ``GB/s`` (1e9 bytes of buffer per second, from the median) in extra_info.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import xxhash

from vimgtools import diff_blocks, hash_blocks, zero_blocks

SIZE = 64 << 20  # bytes per buffer
BLOCK_SIZE = 64 << 10


@pytest.fixture(scope="session")
def buffers() -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """Two different pseudo-random 64 MiB buffers, every page touched."""
    rng = np.random.default_rng(2026)
    return rng.integers(0, 256, SIZE, dtype=np.uint8), rng.integers(0, 256, SIZE, dtype=np.uint8)


@pytest.fixture(scope="session")
def copies(buffers: tuple[npt.NDArray[np.uint8], ...]) -> tuple[npt.NDArray[np.uint8], ...]:
    """Equal copies of ``buffers``: diff_blocks must read every byte of both."""
    return tuple(b.copy() for b in buffers)


@pytest.fixture(scope="session")
def zeros() -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """All-zero buffers: zero_blocks must read every byte."""
    return np.zeros(SIZE, dtype=np.uint8), np.zeros(SIZE, dtype=np.uint8)


@pytest.fixture(scope="session")
def pool() -> Iterator[ThreadPoolExecutor]:
    """Two threads started once, so a timing holds no thread start-up."""
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="bench") as p:
        p.submit(lambda: None).result()
        yield p


def run(benchmark: Any, fn: Callable[[], object], nbytes: int) -> None:
    benchmark(fn)
    if benchmark.stats is not None:  # None when benchmarks are disabled
        benchmark.extra_info["GB/s"] = round(nbytes / benchmark.stats.stats.median / 1e9, 2)


def both(pool: ThreadPoolExecutor, fn: Callable[[Any], object], a: Any, b: Any) -> Callable[[], object]:
    return lambda: [f.result() for f in [pool.submit(fn, a), pool.submit(fn, b)]]


def py_xxhash_loop(buf: np.ndarray) -> list[int]:
    m = memoryview(buf)
    return [xxhash.xxh3_128_intdigest(m[i : i + BLOCK_SIZE]) for i in range(0, SIZE, BLOCK_SIZE)]


HASHERS: dict[str, Callable[[Any], object]] = {
    "engine-xxh128": lambda buf: hash_blocks(buf, BLOCK_SIZE),
    "engine-xxh64": lambda buf: hash_blocks(buf, BLOCK_SIZE, "xxh64"),
    "python-xxhash-loop-xxh128": py_xxhash_loop,
}


@pytest.mark.parametrize("name", HASHERS)
def test_hash_1_thread(benchmark: Any, buffers: tuple[np.ndarray, np.ndarray], name: str) -> None:
    benchmark.group = f"hash {name.split('-')[-1]}, 64 MiB, 64 KiB blocks"
    run(benchmark, lambda: HASHERS[name](buffers[0]), SIZE)


@pytest.mark.parametrize("name", HASHERS)
def test_hash_2_threads(
    benchmark: Any, buffers: tuple[np.ndarray, np.ndarray], pool: ThreadPoolExecutor, name: str
) -> None:
    benchmark.group = f"hash {name.split('-')[-1]}, 64 MiB, 64 KiB blocks"
    run(benchmark, both(pool, HASHERS[name], *buffers), 2 * SIZE)


def test_diff_1_thread(
    benchmark: Any, buffers: tuple[np.ndarray, ...], copies: tuple[np.ndarray, ...]
) -> None:
    benchmark.group = "diff_blocks, two equal 64 MiB buffers"
    run(benchmark, lambda: diff_blocks(buffers[0], copies[0], BLOCK_SIZE), SIZE)


def test_diff_2_threads(
    benchmark: Any, buffers: tuple[np.ndarray, ...], copies: tuple[np.ndarray, ...], pool: ThreadPoolExecutor
) -> None:
    benchmark.group = "diff_blocks, two equal 64 MiB buffers"
    pairs = list(zip(buffers, copies, strict=True))
    run(benchmark, both(pool, lambda p: diff_blocks(p[0], p[1], BLOCK_SIZE), *pairs), 2 * SIZE)


def test_zero_1_thread(benchmark: Any, zeros: tuple[np.ndarray, np.ndarray]) -> None:
    benchmark.group = "zero_blocks, all-zero 64 MiB"
    run(benchmark, lambda: zero_blocks(zeros[0], BLOCK_SIZE), SIZE)


def test_zero_2_threads(
    benchmark: Any, zeros: tuple[np.ndarray, np.ndarray], pool: ThreadPoolExecutor
) -> None:
    benchmark.group = "zero_blocks, all-zero 64 MiB"
    run(benchmark, both(pool, lambda z: zero_blocks(z, BLOCK_SIZE), *zeros), 2 * SIZE)


def test_results_are_real(buffers: tuple[np.ndarray, ...], copies: tuple[np.ndarray, ...]) -> None:
    """What is timed computes what it should (not a benchmark)."""
    assert hash_blocks(buffers[0], BLOCK_SIZE).shape == (SIZE // BLOCK_SIZE, 2)
    assert diff_blocks(buffers[0], copies[0], BLOCK_SIZE).size == 0
    d = py_xxhash_loop(buffers[0])[0]
    assert [int(x) for x in hash_blocks(buffers[0][:BLOCK_SIZE], BLOCK_SIZE)[0]] == [d & (2**64 - 1), d >> 64]
