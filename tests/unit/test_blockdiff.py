"""The native block engine against its plain-Python twin, golden vectors, errors and the GIL.

The twin (``vimgtools._blockdiff_py``: python-xxhash and slicing) is the reference:
hypothesis draws buffers of every supported type and shape, and both engines must
return the same arrays. Error tests run against both, so they also raise alike.
"""

from __future__ import annotations

import array
import ast
import contextlib
import inspect
import mmap
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

import vimgtools
from vimgtools import _blockdiff as native
from vimgtools import _blockdiff_py as twin

KIB, MIB = 1 << 10, 1 << 20
BLOCK_SIZES = [1 << k for k in range(12, 25)]  # 4 KiB .. 16 MiB, every allowed size
MAX_BUFFER = 3 * MIB  # hypothesis buffers stay below this, whatever the block size
ENGINES = pytest.mark.parametrize("engine", [native, twin], ids=["native", "twin"])
FUNCTIONS = ["hash_blocks", "diff_blocks", "zero_blocks", "digest_blocks"]
# The buffer-and-runs functions the sync layer runs on (no numpy), tested below the array API.
SYNC_FUNCTIONS = ["checksum64", "digest_into", "diff_runs", "digest_runs"]
U64 = (1 << 64) - 1


def call(engine: ModuleType, name: str, buf: Any, block_size: Any) -> Any:
    """Call one engine function with one buffer (diff compares it with itself)."""
    if name == "diff_blocks":
        return engine.diff_blocks(buf, buf, block_size)
    if name == "digest_blocks":
        ok = isinstance(block_size, int) and not isinstance(block_size, bool) and block_size > 0
        count = -(-memoryview(buf).nbytes // block_size) if ok and _is_buffer(buf) else 0
        return engine.digest_blocks(
            buf, block_size, 0, np.empty((count, 2), np.uint64), np.empty(count, np.bool_)
        )
    return getattr(engine, name)(buf, block_size)


def _is_buffer(obj: Any) -> bool:
    try:
        memoryview(obj)
    except TypeError:
        return False
    return True


# ---------------------------------------------------------------------------
# Buffers: content, shape and type drawn by hypothesis
# ---------------------------------------------------------------------------

KINDS = ["random", "zero", "zero-but-first", "zero-but-last", "zero-but-middle", "ones"]


def fill(kind: str, n: int, rng: np.random.Generator) -> bytes:
    """One block's bytes: the shapes that trip up hashing and zero detection."""
    if kind == "random":
        return rng.bytes(n)
    b = bytearray(b"\xff" * n if kind == "ones" else n)
    if n and kind.startswith("zero-but-"):
        pos = {"zero-but-first": 0, "zero-but-last": n - 1, "zero-but-middle": n // 2}[kind]
        b[pos] = int(rng.integers(1, 256))
    return bytes(b)


@st.composite
def images(draw: st.DrawFn, block_sizes: list[int] = BLOCK_SIZES) -> tuple[bytes, int]:
    """(data, block_size): a few whole blocks plus an optional short tail, under MAX_BUFFER."""
    bs = draw(st.sampled_from(block_sizes))
    whole = draw(st.integers(0, min(4, MAX_BUFFER // bs)))
    room = min(bs - 1, MAX_BUFFER - whole * bs)
    tail = draw(st.one_of(st.just(0), st.just(1), st.just(room), st.integers(0, room)))
    rng = np.random.default_rng(draw(st.integers(0, U64)))
    sizes = [bs] * whole + ([tail] if tail else [])
    return b"".join(fill(draw(st.sampled_from(KINDS)), n, rng) for n in sizes), bs


def _mmap(data: bytes) -> Any:
    m = mmap.mmap(-1, len(data))
    m.write(data)
    return m


# name -> (item size, maker). Non-byte items: the data is cut to a whole number of items.
BUFFER_TYPES: dict[str, tuple[int, Callable[[bytes], Any]]] = {
    "bytes": (1, bytes),
    "bytearray": (1, bytearray),
    "memoryview": (1, memoryview),
    "memoryview-unaligned": (1, lambda d: memoryview(b"xyz" + d)[3:]),  # odd start address
    "readonly-memoryview": (1, lambda d: memoryview(bytearray(d)).toreadonly()),
    "mmap": (1, _mmap),
    "array-B": (1, lambda d: array.array("B", d)),
    "array-I": (4, lambda d: array.array("I", d)),
    "numpy-uint8": (1, lambda d: np.frombuffer(d, dtype=np.uint8)),
    "numpy-uint64": (8, lambda d: np.frombuffer(d, dtype=np.uint64)),
    "numpy-float32": (4, lambda d: np.frombuffer(d, dtype=np.float32)),
    "numpy->u2": (2, lambda d: np.frombuffer(d, dtype=">u2")),  # big-endian: format ">H"
    "numpy-complex128": (16, lambda d: np.frombuffer(d, dtype=np.complex128)),
    "numpy-2d": (1, lambda d: np.frombuffer(d, dtype=np.uint8).reshape(-1, 1)),
    "numpy-writable": (1, lambda d: np.frombuffer(bytearray(d), dtype=np.uint8)),
}


@contextlib.contextmanager
def buffer_maker() -> Iterator[Callable[[str, bytes], tuple[Any, bytes]]]:
    """Make a buffer of a given type; mmaps are closed afterwards, which fails if a view leaked."""
    opened: list[Any] = []

    def make(kind: str, data: bytes) -> tuple[Any, bytes]:
        itemsize, maker = BUFFER_TYPES[kind]
        data = data[: len(data) - len(data) % itemsize]
        if kind == "mmap" and not data:
            kind, maker = "bytes", bytes  # an mmap cannot be empty
        buf = maker(data)
        if kind == "mmap":
            opened.append(buf)
        return buf, data

    yield make
    for m in opened:
        m.close()  # BufferError if the engine still held an export


buffer_types = st.sampled_from(sorted(BUFFER_TYPES))
algorithms = st.sampled_from(["xxh128", "xxh64"])
seeds = st.one_of(st.just(0), st.just(1), st.just(U64), st.integers(0, U64))


def expected_count(n: int, bs: int) -> int:
    return -(-n // bs)


# ---------------------------------------------------------------------------
# Native == twin, for every buffer type, shape and block size
# ---------------------------------------------------------------------------


@given(image=images(), kind=buffer_types, algorithm=algorithms, seed=seeds)
def test_hash_blocks_matches_twin(image: tuple[bytes, int], kind: str, algorithm: str, seed: int) -> None:
    with buffer_maker() as as_buffer:
        buf, data = as_buffer(kind, image[0])
        bs = image[1]
        got = native.hash_blocks(buf, bs, algorithm, seed)
        want = twin.hash_blocks(buf, bs, algorithm, seed)
        count = expected_count(len(data), bs)
        assert got.dtype == np.uint64
        assert got.shape == ((count, 2) if algorithm == "xxh128" else (count,))
        assert got.flags.c_contiguous
        np.testing.assert_array_equal(got, want)


@given(image=images(), kind=buffer_types)
def test_zero_blocks_matches_twin(image: tuple[bytes, int], kind: str) -> None:
    with buffer_maker() as as_buffer:
        buf, data = as_buffer(kind, image[0])
        bs = image[1]
        got = native.zero_blocks(buf, bs)
        assert got.dtype == np.bool_
        assert got.shape == (expected_count(len(data), bs),)
        np.testing.assert_array_equal(got, twin.zero_blocks(buf, bs))


@given(
    image=images(),
    kind_a=buffer_types,
    kind_b=buffer_types,
    where=st.lists(st.floats(0, 1, exclude_max=True), max_size=6),
    edges=st.lists(st.sampled_from(["first", "last"]), max_size=2),
)
def test_diff_blocks_matches_twin(
    image: tuple[bytes, int], kind_a: str, kind_b: str, where: list[float], edges: list[str]
) -> None:
    with buffer_maker() as as_buffer:
        data, bs = image
        itemsize = max(BUFFER_TYPES[kind_a][0], BUFFER_TYPES[kind_b][0])
        data = data[: len(data) - len(data) % itemsize]
        changed = bytearray(data)
        positions = {int(w * len(data)) for w in where if data}
        for i in range(0, len(data), bs):  # a block's first or last byte: off-by-one territory
            positions |= {i if e == "first" else min(i + bs, len(data)) - 1 for e in edges}
        for p in positions:
            changed[p] ^= 0x5A
        a, _ = as_buffer(kind_a, data)
        b, _ = as_buffer(kind_b, bytes(changed))
        got = native.diff_blocks(a, b, bs)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, twin.diff_blocks(a, b, bs))
        np.testing.assert_array_equal(got, sorted({p // bs for p in positions}))
        assert native.diff_blocks(a, a, bs).size == 0


@given(
    image=images(),
    kind=buffer_types,
    seed=seeds,
    flips=st.lists(st.floats(0, 1, exclude_max=True), max_size=4),
)
def test_digest_blocks_matches_twin(
    image: tuple[bytes, int], kind: str, seed: int, flips: list[float]
) -> None:
    """Digests and zero flags as hash_blocks/zero_blocks give them; the changed non-zero blocks found."""
    with buffer_maker() as as_buffer:
        buf, data = as_buffer(kind, image[0])
        bs = image[1]
        count = expected_count(len(data), bs)
        against = twin.hash_blocks(data, bs, "xxh128", seed)
        flipped = {int(f * count) for f in flips} if count else set()
        for i in flipped:  # the other side differs in these blocks
            against[i, 0] ^= 1
        results = []
        for engine in (native, twin):
            digests, zero = np.empty((count, 2), np.uint64), np.empty(count, np.bool_)
            found = engine.digest_blocks(buf, bs, seed, digests, zero, against)
            assert found.dtype == np.int64
            np.testing.assert_array_equal(digests, twin.hash_blocks(data, bs, "xxh128", seed))
            np.testing.assert_array_equal(zero, twin.zero_blocks(data, bs))
            assert engine.digest_blocks(buf, bs, seed, digests, zero).size == 0  # nothing to compare with
            results.append(found.tolist())
        assert results[0] == results[1]
        assert results[0] == sorted(i for i in flipped if not zero[i])


@given(
    image=images(),
    kind=buffer_types,
    seed=seeds,
    flips=st.lists(st.floats(0, 1, exclude_max=True), max_size=4),
)
def test_sync_functions_match_twin_and_the_array_api(
    image: tuple[bytes, int], kind: str, seed: int, flips: list[float]
) -> None:
    """digest_into / diff_runs / digest_runs / checksum64: the twin's answers, and the array API's."""
    with buffer_maker() as as_buffer:
        buf, data = as_buffer(kind, image[0])
        bs = image[1]
        count = expected_count(len(data), bs)
        flipped = {int(f * count) for f in flips} if count else set()
        other = bytearray(data)
        for i in flipped:  # the other image differs in these blocks (a zero block stays zero)
            if any(data[i * bs : (i + 1) * bs]):
                other[i * bs] ^= 0xFF
            else:
                other[i * bs] = 1
        against = bytearray(twin.hash_blocks(bytes(other), bs, "xxh128", seed).tobytes())
        zero_ref = bytes(twin.zero_blocks(data, bs).astype(np.uint8))
        answers = []
        for engine in (native, twin):
            digests, zero = bytearray(16 * count), bytearray(count)
            found = engine.digest_into(buf, bs, seed, digests, zero, against)
            assert bytes(digests) == twin.hash_blocks(data, bs, "xxh128", seed).tobytes()
            assert bytes(zero) == zero_ref
            assert engine.digest_into(buf, bs, seed, digests, zero) == []
            runs = engine.diff_runs(buf, bytes(other), bs)
            dig_runs = engine.digest_runs(digests, against, zero)
            answers.append((found, runs, dig_runs, engine.checksum64(buf)))
        assert answers[0] == answers[1]
        found, runs, dig_runs, checksum = answers[0]
        changed = [i for b0, b1, _ in runs for i in range(b0, b1)]
        assert changed == twin.diff_blocks(data, bytes(other), bs).tolist() == sorted(flipped)
        assert all(z == all(zero_ref[b0:b1]) for b0, b1, z in runs)
        assert dig_runs == runs  # XXH3-128 digests tell the same blocks apart
        assert [i for b0, b1 in found for i in range(b0, b1)] == [i for i in changed if not zero_ref[i]]
        assert checksum == xxhash.xxh3_64_intdigest(data)


def test_sync_functions_refuse_buffers_that_do_not_fit() -> None:
    data = bytes(3 * 4096)
    with pytest.raises(ValueError):
        native.digest_into(data, 4096, 0, bytearray(16 * 2), bytearray(3))
    with pytest.raises(ValueError):
        native.digest_into(data, 4096, 0, bytearray(16 * 3), bytearray(2))
    with pytest.raises(ValueError):
        native.digest_into(data, 4096, 0, bytearray(16 * 3), bytearray(3), bytes(16))
    with pytest.raises(TypeError):
        native.digest_into(data, 4096, 0, bytes(16 * 3), bytearray(3))  # read-only
    with pytest.raises(ValueError):
        native.diff_runs(data, data[:-1], 4096)
    with pytest.raises(ValueError):
        native.digest_runs(bytes(32), bytes(16), bytes(2))
    with pytest.raises(ValueError):
        native.digest_runs(bytes(32), bytes(32), bytes(1))


def test_a_local_raw_sync_loads_nothing_it_does_not_use(tmp_path: Path) -> None:
    """Start-up is paid on every run (issue 14). The array API loads numpy on first use; a sync run
    (buffers and runs) never does. The CLI's parser does not load shutil (argparse's formatter would,
    for the terminal's width); a run on raw images starts no process (subprocess), speaks no JSON
    without --json, and the sync path defines no dataclass (dataclasses imports inspect and ast,
    and each class costs ~1 ms of generated code: ~35 ms of a start-up here)."""
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    a.write_bytes(bytes(range(256)) * 4096)
    unused = ("numpy", "shutil", "subprocess", "json", "dataclasses")
    code = (
        "import sys, vimgtools.sync.__main__ as m, vimgtools.blocks as b; "
        f"m.build_parser().parse_args(['--state', 'S', 'a', 'b']); m.sync({str(a)!r}, {str(b)!r}); "
        f"late = [n for n in {unused!r} if n in sys.modules]; "
        "assert not late, f'loaded: {late}'; "
        "b.hash_blocks(bytes(4096), 4096); assert 'numpy' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize(
    "arrays",
    [
        lambda: (np.empty((3, 2), np.uint64), np.empty(2, np.bool_), None),  # one block too many
        lambda: (np.empty((2, 2), np.int64), np.empty(2, np.bool_), None),
        lambda: (np.empty((2, 2), np.uint64), np.empty(2, np.uint8), None),
        lambda: (np.empty((2, 2), np.uint64), np.empty(2, np.bool_), np.empty((1, 2), np.uint64)),
        lambda: ([[0, 0], [0, 0]], np.empty(2, np.bool_), None),
    ],
    ids=["digests-shape", "digests-dtype", "zero-dtype", "against-shape", "digests-list"],
)
@ENGINES
def test_digest_blocks_refuses_arrays_that_do_not_fit(engine: ModuleType, arrays: Callable[[], Any]) -> None:
    digests, zero, against = arrays()
    with pytest.raises(ValueError, match=r"must be a (uint64|bool) array of shape \(2"):
        engine.digest_blocks(bytes(5000), 4096, 0, digests, zero, against)


@pytest.mark.parametrize("block_size", BLOCK_SIZES, ids=[f"{b // KIB}K" for b in BLOCK_SIZES])
def test_every_block_size_partial_last_block(block_size: int) -> None:
    """Each allowed size, with a buffer that ends in a short block (a single one for the big sizes)."""
    n = min(2 * block_size + 123, block_size // 2 + 7) if block_size > MIB else 2 * block_size + 123
    data = np.random.default_rng(block_size).bytes(n)
    zeroed = bytes(n // 2) + data[n // 2 :]
    for algorithm in ("xxh128", "xxh64"):
        np.testing.assert_array_equal(
            native.hash_blocks(data, block_size, algorithm), twin.hash_blocks(data, block_size, algorithm)
        )
    np.testing.assert_array_equal(
        native.zero_blocks(zeroed, block_size), twin.zero_blocks(zeroed, block_size)
    )
    np.testing.assert_array_equal(
        native.diff_blocks(data, zeroed, block_size), twin.diff_blocks(data, zeroed, block_size)
    )


def test_largest_block_size_full_and_short_block() -> None:
    """16 MiB blocks: one full block and a 3-byte tail, checked straight against xxhash."""
    bs = 16 * MIB
    data = bytearray(bs + 3)
    data[-1] = 1  # the short block is not zero; the full one is
    h = native.hash_blocks(data, bs)
    for row, block in zip(h, (data[:bs], data[bs:]), strict=True):
        d = xxhash.xxh3_128_intdigest(bytes(block))
        assert (int(row[0]), int(row[1])) == (d & U64, d >> 64)
    assert native.zero_blocks(data, bs).tolist() == [True, False]
    other = bytearray(data)
    other[bs - 1] = 7
    assert native.diff_blocks(data, other, bs).tolist() == [0]


@pytest.mark.parametrize("kind", sorted(BUFFER_TYPES))
def test_empty_buffers(kind: str) -> None:
    with buffer_maker() as as_buffer:
        buf, _ = as_buffer(kind, b"")
        assert native.hash_blocks(buf, 4096).shape == (0, 2)
        assert native.hash_blocks(buf, 4096, "xxh64").shape == (0,)
        assert native.zero_blocks(buf, 4096).shape == (0,)
        assert native.diff_blocks(buf, buf, 4096).shape == (0,)
        assert native.hash_blocks(buf, 4096).dtype == np.uint64
        assert native.diff_blocks(buf, buf, 4096).dtype == np.int64
        assert native.zero_blocks(buf, 4096).dtype == np.bool_


@ENGINES
def test_empty_multidimensional_array(engine: ModuleType) -> None:
    """A (0, 5) array is an empty buffer, not an error (memoryview.cast alone would refuse it)."""
    empty = np.zeros((0, 5), dtype=np.float64)
    assert engine.hash_blocks(empty, 4096).shape == (0, 2)
    assert engine.zero_blocks(empty, 4096).shape == (0,)
    assert engine.diff_blocks(empty, b"", 4096).shape == (0,)


def test_buffer_is_released_after_the_call() -> None:
    """The result keeps no view on the input: a bytearray can be resized afterwards."""
    data = bytearray(10_000)
    native.hash_blocks(data, 4096)
    native.zero_blocks(data, 4096)
    native.diff_blocks(data, bytes(data), 4096)
    data.extend(b"more")  # BufferError if an export were still alive


# ---------------------------------------------------------------------------
# Golden vectors: computed once with the python-xxhash package (4.1.0)
# ---------------------------------------------------------------------------

GOLDEN_DATA = b"vimgtools" * 1000  # 9000 bytes: two 4 KiB blocks and an 808-byte tail
GOLDEN_128 = {
    0: [
        (0xC06A592852A651C8, 0x56CC86E51A3E6857),
        (0x238B733BA1000D70, 0xB6CD216CEDBF2BD4),
        (0x6A9A9A5A97001967, 0xA2124A43243D7FEF),
    ],
    42: [
        (0xB3C05E1A319D40DD, 0x73FB6CD7C193596D),
        (0x140D6BE3ACB8509F, 0x140F1D96D7219CEE),
        (0x6AB8C4376AD35ACF, 0x005295928905E5EB),
    ],
    U64: [
        (0x350F8F991A7BDC87, 0x659D8740F43FD75A),
        (0x0A146A8157DEB566, 0x6943360847DA7085),
        (0xBEE017A506316AEA, 0xAEB5C28DD0FFCCA8),
    ],
}
# XXH3-64 of inputs over 240 bytes equals the low half of XXH3-128 with the same seed.
GOLDEN_64 = {seed: [low for low, _ in rows] for seed, rows in GOLDEN_128.items()}
ZERO_4K_128 = (0x93D76FE148C689BA, 0x3EE8DC4F9E7EE495)


@pytest.mark.parametrize("seed", sorted(GOLDEN_128))
@ENGINES
def test_golden_vectors(engine: ModuleType, seed: int) -> None:
    h128 = engine.hash_blocks(GOLDEN_DATA, 4096, "xxh128", seed)
    assert [(int(lo), int(hi)) for lo, hi in h128] == GOLDEN_128[seed]
    assert engine.hash_blocks(GOLDEN_DATA, 4096, "xxh64", seed).tolist() == GOLDEN_64[seed]


@ENGINES
def test_golden_zero_block(engine: ModuleType) -> None:
    assert [tuple(int(x) for x in row) for row in engine.hash_blocks(bytes(4096), 4096)] == [ZERO_4K_128]


def test_row_layout_is_low_then_high() -> None:
    """Row [low, high] rebuilds xxhash's 128-bit integer as ``low | high << 64``."""
    lo, hi = (int(x) for x in native.hash_blocks(GOLDEN_DATA[:4096], 4096)[0])
    assert lo | hi << 64 == xxhash.xxh3_128_intdigest(GOLDEN_DATA[:4096])
    assert (
        native.hash_blocks(GOLDEN_DATA, 4096, seed=0).tolist()
        == native.hash_blocks(GOLDEN_DATA, 4096).tolist()
    )


# ---------------------------------------------------------------------------
# Errors: the same type and message from both engines
# ---------------------------------------------------------------------------

BAD_SIZES = [0, -4096, 1, 2048, 4095, 4097, 12288, 3 * MIB, 16 * MIB + 1, 32 * MIB, 1 << 64]


@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize("block_size", BAD_SIZES)
@ENGINES
def test_bad_block_size(engine: ModuleType, name: str, block_size: int) -> None:
    with pytest.raises(ValueError, match=r"power of two from 4096 \(4 KiB\) to 16777216 \(16 MiB\)") as e:
        call(engine, name, b"x" * 10, block_size)
    assert f"block_size {block_size} is not allowed" in str(e.value)


@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize("block_size", [True, 4096.0, "4096", None, np.int64(4096)], ids=repr)
@ENGINES
def test_block_size_not_an_int(engine: ModuleType, name: str, block_size: Any) -> None:
    with pytest.raises(TypeError, match=rf"block_size must be an int, not {type(block_size).__name__}$"):
        call(engine, name, b"x" * 10, block_size)


@pytest.mark.parametrize("algorithm", ["md5", "XXH128", "xxh3", "", None])
@ENGINES
def test_unknown_algorithm_lists_known_ones(engine: ModuleType, algorithm: Any) -> None:
    with pytest.raises(ValueError, match=r"unknown algorithm .*: known are xxh128, xxh64$"):
        engine.hash_blocks(b"x" * 10, 4096, algorithm)


@ENGINES
def test_diff_of_different_lengths(engine: ModuleType) -> None:
    with pytest.raises(ValueError, match=r"^buffers differ in length: 5000 and 5001 bytes$"):
        engine.diff_blocks(bytes(5000), bytes(5001), 4096)
    with pytest.raises(ValueError, match="differ in length"):
        engine.diff_blocks(b"", b"x", 4096)


NON_CONTIGUOUS = {
    "numpy-step": lambda: np.zeros(8192, dtype=np.uint8)[::2],
    "numpy-fortran": lambda: np.zeros((64, 64), dtype=np.uint8, order="F"),
    "numpy-column": lambda: np.zeros((64, 64), dtype=np.uint8)[:, :3],
    "memoryview-step": lambda: memoryview(bytes(8192))[::2],
}


@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize("make", NON_CONTIGUOUS.values(), ids=NON_CONTIGUOUS.keys())
@ENGINES
def test_non_contiguous_buffer(engine: ModuleType, name: str, make: Callable[[], Any]) -> None:
    with pytest.raises(ValueError, match=r"^buffer must be C-contiguous$"):
        call(engine, name, make(), 4096)


@ENGINES
def test_diff_checks_both_buffers(engine: ModuleType) -> None:
    good, bad = np.zeros(4096, dtype=np.uint8), np.zeros(8192, dtype=np.uint8)[::2]
    for a, b in ((good, bad), (bad, good)):
        with pytest.raises(ValueError, match="C-contiguous"):
            engine.diff_blocks(a, b, 4096)


@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize("obj", ["text", 12, None, [1, 2], 1.5], ids=repr)
@ENGINES
def test_not_a_buffer(engine: ModuleType, name: str, obj: Any) -> None:
    with pytest.raises(TypeError, match="bytes-like object is required"):
        call(engine, name, obj, 4096)


@pytest.mark.parametrize("seed", ["1", None, b"1"], ids=repr)
@ENGINES
def test_seed_not_an_int(engine: ModuleType, seed: Any) -> None:
    with pytest.raises(TypeError):
        engine.hash_blocks(b"x" * 10, 4096, "xxh128", seed)


@pytest.mark.parametrize("seed", [-1, 1 << 64])
@ENGINES
def test_seed_out_of_range(engine: ModuleType, seed: int) -> None:
    with pytest.raises(ValueError, match="seed"):
        engine.hash_blocks(b"x" * 10, 4096, "xxh128", seed)


@pytest.mark.parametrize("seed", [1.5, True, "1"])
@ENGINES
def test_seed_of_another_type_is_refused(engine: ModuleType, seed: object) -> None:
    with pytest.raises(TypeError, match="seed"):
        engine.hash_blocks(b"x" * 10, 4096, "xxh128", seed)


# ---------------------------------------------------------------------------
# The GIL is released for the per-byte work
# ---------------------------------------------------------------------------


def python_progress_during(
    work: Callable[[], object], attempts: int = 100, each: Callable[[], object] = lambda: None
) -> int:
    """Python-level iterations another thread makes while ``work()`` runs (0 if none in any attempt).

    The switch interval is raised to 30 s, so the interpreter never takes the GIL from
    this thread while it runs ``work`` (milliseconds, even over all attempts): the
    other thread can only run if ``work`` releases the GIL. It gives the GIL back at
    once (``sleep(0)`` each iteration), so nothing waits for a switch interval. Several
    attempts, because the other thread may not be woken within one short call; a call
    that keeps the GIL shows 0 in every attempt. No duration is asserted. The other
    thread calls ``each()`` in every iteration.
    """
    state = {"count": 0, "stop": False}

    def spin() -> None:
        while not state["stop"]:
            each()
            state["count"] += 1
            time.sleep(0)  # releases the GIL

    old = sys.getswitchinterval()
    sys.setswitchinterval(30)
    t = threading.Thread(target=spin, daemon=True)
    try:
        t.start()
        for _ in range(attempts):
            before = state["count"]
            work()
            progress = state["count"] - before
            if progress:
                return progress
        return 0
    finally:
        state["stop"] = True
        t.join()
        sys.setswitchinterval(old)


BIG = np.random.default_rng(7).integers(0, 256, 32 * MIB, dtype=np.uint8)
BIG_COPY = BIG.copy()
BIG_ZERO = np.zeros(32 * MIB, dtype=np.uint8)


@pytest.mark.parametrize(
    "work",
    [
        lambda: native.hash_blocks(BIG, 65536),
        lambda: native.hash_blocks(BIG, 65536, "xxh64"),
        lambda: native.diff_blocks(BIG, BIG_COPY, 65536),
        lambda: native.zero_blocks(BIG_ZERO, 65536),
        lambda: native.digest_blocks(
            BIG,
            65536,
            1,
            np.empty((512, 2), np.uint64),
            np.empty(512, np.bool_),
            np.zeros((512, 2), np.uint64),
        ),
    ],
    ids=["hash_blocks-xxh128", "hash_blocks-xxh64", "diff_blocks", "zero_blocks", "digest_blocks"],
)
def test_gil_is_released(work: Callable[[], object]) -> None:
    assert python_progress_during(work) > 0


def test_gil_probe_detects_a_gil_holding_call() -> None:
    """The control: a C call that keeps the GIL lets the other thread make no progress."""
    assert python_progress_during(lambda: sum(range(300_000))) == 0


def test_two_threads_hash_concurrently() -> None:
    """A thread completes whole hash_blocks calls on its buffer while another is inside one."""
    a, b = BIG[: 24 * MIB], BIG[24 * MIB :]
    want_b = twin.hash_blocks(b, 65536)
    seen: list[Any] = []
    progress = python_progress_during(
        lambda: seen.append(native.hash_blocks(a, 65536)),
        each=lambda: seen.append(native.hash_blocks(b, 65536)),
    )
    assert progress > 0
    want_a = twin.hash_blocks(a, 65536)
    for h in seen:  # and both threads got right answers
        assert np.array_equal(h, want_a if len(h) == len(want_a) else want_b)


# ---------------------------------------------------------------------------
# The package surface: one engine, its stub, no silent fallback
# ---------------------------------------------------------------------------


def test_package_reexports_the_native_engine() -> None:
    assert vimgtools.hash_blocks is native.hash_blocks
    assert vimgtools.diff_blocks is native.diff_blocks
    assert vimgtools.zero_blocks is native.zero_blocks
    assert native.__file__ is not None and native.__file__.endswith(".so")


def test_twin_shares_constants_and_signatures() -> None:
    assert (
        (native.MIN_BLOCK_SIZE, native.MAX_BLOCK_SIZE)
        == (twin.MIN_BLOCK_SIZE, twin.MAX_BLOCK_SIZE)
        == (
            4096,
            16 * MIB,
        )
    )
    assert native.ALGORITHMS == twin.ALGORITHMS == ("xxh128", "xxh64")
    for name in FUNCTIONS + SYNC_FUNCTIONS:
        ours, theirs = (inspect.signature(getattr(m, name)).parameters for m in (native, twin))
        assert [(p.name, p.default) for p in ours.values()] == [(p.name, p.default) for p in theirs.values()]


def test_stub_matches_the_module() -> None:
    """_blockdiff.pyi names the same functions and parameters as the built module."""
    stub = ast.parse(Path(native.__file__).with_name("_blockdiff.pyi").read_text())
    funcs = {f.name: [a.arg for a in f.args.args] for f in stub.body if isinstance(f, ast.FunctionDef)}
    assert set(funcs) == set(FUNCTIONS + SYNC_FUNCTIONS)
    for name, params in funcs.items():
        assert params == list(inspect.signature(getattr(native, name)).parameters)


MISSING_BUILD = textwrap.dedent(
    """
    import sys

    class Blocker:  # stands in for an unbuilt (or unloadable) extension module
        def find_spec(self, name, path=None, target=None):
            if name == "vimgtools._blockdiff":
                raise ImportError(CAUSE, name=name)
            return None

    sys.meta_path.insert(0, Blocker())
    try:
        import vimgtools
    except ImportError as e:
        print(type(e).__name__, "|", e, "|", type(e.__cause__).__name__)
    else:
        print("imported", vimgtools.hash_blocks.__module__)
    """
)


@pytest.mark.parametrize(
    "cause",
    [
        "No module named 'vimgtools._blockdiff'",  # never built
        "libxxhash.so.0: cannot open shared object file: No such file or directory",  # built, lib gone
    ],
)
def test_missing_native_build_is_a_clear_import_error(cause: str) -> None:
    """No silent fallback to the twin: ``import vimgtools`` fails and says what to do."""
    code = f"CAUSE = {cause!r}\n" + MISSING_BUILD
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    kind, message, chained = (part.strip() for part in out.split("|"))
    assert kind == "ImportError"
    assert "vimgtools._blockdiff" in message
    assert "libxxhash-dev" in message
    assert "pip install" in message
    assert cause in message  # the underlying reason is kept
    assert chained == "ImportError"


def test_unbuilt_checkout_is_a_clear_import_error(tmp_path: Path) -> None:
    """For real: a copy of the package without the compiled .so, in an interpreter without site-packages."""
    pkg = Path(vimgtools.__file__).parent
    shutil.copytree(pkg, tmp_path / "vimgtools", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    code = f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import vimgtools"
    r = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True)
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: vimgtools: the native engine vimgtools._blockdiff is not built")
    assert "libxxhash-dev" in last
    assert "No module named 'vimgtools._blockdiff'" in last


def test_the_system_libxxhash_dispatch_is_used_when_it_has_one() -> None:
    """A libxxhash built with DISPATCH=1 (Debian's) picks SSE2/AVX2/AVX-512 at run time: the engine uses it."""
    import ctypes
    import ctypes.util

    lib = ctypes.CDLL(ctypes.util.find_library("xxhash") or "libxxhash.so.0")
    assert hasattr(lib, "XXH3_128bits_withSeed_dispatch") is native.XXH3_DISPATCH
    assert twin.XXH3_DISPATCH is False
    data = bytes(range(256)) * 64 + b"tail"  # long input (the vector code) and a short last block
    for seed in (0, 1, 2**64 - 1):
        for algorithm in ("xxh128", "xxh64"):
            assert np.array_equal(
                native.hash_blocks(data, 4096, algorithm, seed), twin.hash_blocks(data, 4096, algorithm, seed)
            )
