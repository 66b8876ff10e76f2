#!/usr/bin/env python3
"""The native engine beside a plain C loop, xxhsum and python-xxhash, in one run.

Builds benchmarks/c_loop.c (``gcc -O3 -DXXH_INLINE_ALL``, the system's xxhash.h)
into a temporary directory, then times, interleaved round by round over the very
same buffers so that a busy neighbour slows every contender alike:

- ``hash_blocks`` XXH128 on one buffer (1 thread) and on two buffers at once (2 threads);
- the C loop calling ``XXH3_128bits_withSeed`` per block, through ctypes (which
  releases the GIL), 1 and 2 threads;
- a python-xxhash loop, one ``xxh3_128_intdigest`` call per block;
- ``diff_blocks`` on two equal buffers, ``zero_blocks`` on an all-zero buffer;
- the same hashing over a small, cache-resident buffer, which separates the
  code's own speed (and its 2-thread scaling) from the memory system's.

It also runs the C loop as a standalone program and ``xxhsum -b`` (Debian package
``xxhash``) for reference. GB/s are 10**9 bytes per second of buffer processed.

Usage: .venv/bin/python benchmarks/engine_vs_c.py [--size-mib 64] [--block-kib 64] [--repeats 21]
"""

from __future__ import annotations

import argparse
import ctypes
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import xxhash

from vimgtools import diff_blocks, hash_blocks, zero_blocks

HERE = Path(__file__).resolve().parent
C_SOURCE = HERE / "c_loop.c"
CFLAGS = ["-O3", "-DXXH_INLINE_ALL"]  # as the issue asks; no -march, like the engine's build

# Targets from issue 2.
TARGET_VS_C = 0.70
TARGET_SPEEDUP = 1.6
TARGET_DIFF_GBS = 5.0


def build_c(tmp: Path) -> tuple[ctypes.CDLL, Path]:
    if shutil.which("gcc") is None:
        sys.exit("engine_vs_c: gcc is missing (apt-get install gcc)")
    if not Path("/usr/include/xxhash.h").is_file():
        sys.exit("engine_vs_c: /usr/include/xxhash.h is missing (apt-get install libxxhash-dev)")
    so, exe = tmp / "c_loop.so", tmp / "c_loop"
    subprocess.run(["gcc", *CFLAGS, "-shared", "-fPIC", str(C_SOURCE), "-o", str(so)], check=True)
    subprocess.run(["gcc", *CFLAGS, str(C_SOURCE), "-o", str(exe), "-lpthread"], check=True)
    lib = ctypes.CDLL(str(so))  # CDLL (not PyDLL): calls release the GIL
    lib.c_loop_xxh128.restype = ctypes.c_uint64
    lib.c_loop_xxh128.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_size_t,
        ctypes.c_uint64,
        ctypes.c_uint,
    ]
    return lib, exe


def in_threads(*jobs: Callable[[], object]) -> None:
    """Run each job in its own thread; return when all are done."""
    threads = [threading.Thread(target=j) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def xxhsum_gbs(block_size: int) -> float | None:
    """``xxhsum -b`` for XXH128 with seed (variant 13) over a block-sized sample, in GB/s."""
    if shutil.which("xxhsum") is None:
        return None
    out = subprocess.run(
        ["xxhsum", "-q", "-b13", f"-B{block_size}"], capture_output=True, text=True, check=True
    )
    found = re.findall(r"#XXH128[^:]*:.*?\(\s*([\d.]+) MB/s\)", out.stdout + out.stderr)
    # xxhsum's "MB" is 2**20 bytes.
    return float(found[-1]) * 2**20 / 1e9 if found else None


def standalone_c(exe: Path, size: int, block_size: int, repeats: int, threads: int) -> float:
    out = subprocess.run(
        [str(exe), str(size), str(block_size), str(repeats), str(threads)],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.split()[0])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mib", type=int, default=64, help="buffer size per thread (default 64)")
    p.add_argument("--block-kib", type=int, default=64, help="block size (default 64)")
    p.add_argument("--repeats", type=int, default=21, help="interleaved rounds; medians are shown")
    p.add_argument("--passes", type=int, default=4, help="passes over the buffer per timing (default 4)")
    p.add_argument("--cache-kib", type=int, default=256, help="cache-resident buffer (default 256)")
    args = p.parse_args(argv)
    size, bs, passes = args.size_mib << 20, args.block_kib << 10, args.passes
    small = args.cache_kib << 10
    small_passes = max(1, passes * size // small)  # the cache runs process as many bytes as the big ones

    with tempfile.TemporaryDirectory(prefix="vimg-bench-") as tmpdir:
        lib, exe = build_c(Path(tmpdir))
        rng = np.random.default_rng(2026)
        a = rng.integers(0, 256, size, dtype=np.uint8)
        b = rng.integers(0, 256, size, dtype=np.uint8)
        a_copy = a.copy()
        zeros = np.zeros(size, dtype=np.uint8)
        sa, sb = a[:small].copy(), b[:small].copy()
        pa, pb, psa, psb = (x.ctypes.data for x in (a, b, sa, sb))
        # Same answers before timing anything: the C loop hashes what the engine hashes.
        want = np.bitwise_xor.reduce(hash_blocks(a, bs).ravel())
        got = lib.c_loop_xxh128(pa, size, bs, 0, 1)
        assert int(want) == got, "C loop and engine disagree"

        # Each timing makes `passes` passes over its buffer, so that starting threads
        # (about 0.1 ms) stays small beside the work.
        def engine(buf: np.ndarray, k: int = passes) -> Callable[[], object]:
            return lambda: [hash_blocks(buf, bs) for _ in range(k)]

        def c_hash(ptr: int, n: int, k: int = passes) -> Callable[[], object]:
            return lambda: lib.c_loop_xxh128(ptr, n, bs, 0, k)

        def py_loop(buf: np.ndarray) -> Callable[[], object]:
            m = memoryview(buf)
            return lambda: [
                xxhash.xxh3_128_intdigest(m[i : i + bs]) for _ in range(passes) for i in range(0, size, bs)
            ]

        big, cache = passes * size, small_passes * small
        cases: dict[str, tuple[int, Callable[[], object]]] = {
            "engine1": (big, engine(a)),
            "c1": (big, c_hash(pa, size)),
            "engine2": (2 * big, lambda: in_threads(engine(a), engine(b))),
            "c2": (2 * big, lambda: in_threads(c_hash(pa, size), c_hash(pb, size))),
            "py1": (big, py_loop(a)),
            "py2": (2 * big, lambda: in_threads(py_loop(a), py_loop(b))),
            "diff": (big, lambda: [diff_blocks(a, a_copy, bs) for _ in range(passes)]),
            "zero": (big, lambda: [zero_blocks(zeros, bs) for _ in range(passes)]),
            "engine1_cache": (cache, engine(sa, small_passes)),
            "c1_cache": (cache, c_hash(psa, small, small_passes)),
            "engine2_cache": (
                2 * cache,
                lambda: in_threads(engine(sa, small_passes), engine(sb, small_passes)),
            ),
            "c2_cache": (
                2 * cache,
                lambda: in_threads(c_hash(psa, small, small_passes), c_hash(psb, small, small_passes)),
            ),
        }
        names = list(cases)
        times: dict[str, list[float]] = {k: [] for k in names}
        for fn in (f for _, f in cases.values()):  # warm up: page faults, thread pools, caches
            fn()
        for r in range(args.repeats):
            order = names[r % len(names) :] + names[: r % len(names)]  # rotate: no fixed neighbour
            for k in order:
                t0 = time.perf_counter()
                cases[k][1]()
                times[k].append(time.perf_counter() - t0)
        gbs = {k: cases[k][0] / statistics.median(times[k]) / 1e9 for k in names}
        spread = {k: (cases[k][0] / max(times[k]) / 1e9, cases[k][0] / min(times[k]) / 1e9) for k in names}
        exe1 = standalone_c(exe, size, bs, args.repeats, 1)
        exe2 = standalone_c(exe, size, bs, args.repeats, 2)
    xs = xxhsum_gbs(bs)

    def row(label: str, value: float | None, ratio: str = "", verdict: str = "", k: str = "") -> None:
        v = f"{value:7.2f}" if value is not None else "    n/a"
        rng_txt = f"{spread[k][0]:5.1f}..{spread[k][1]:<5.1f}" if k else ""
        print(f"  {label:<52} {v}  {rng_txt:<12} {ratio:<14} {verdict}")

    def verdict(ok: bool, target: str) -> str:
        return f"{'PASS' if ok else 'FAIL'} (target {target})"

    c1, e1 = gbs["c1"], gbs["engine1"]
    print(
        f"vimgtools engine vs C: {args.size_mib} MiB buffer per thread, {args.block_kib} KiB blocks, "
        f"{passes} passes per timing, median of {args.repeats} interleaved rounds "
        "(GB/s = 1e9 B/s; min..max beside)"
    )
    print(f"  cflags for the C loop: {' '.join(CFLAGS)}; numpy {np.__version__}, xxhash {xxhash.VERSION}")
    print()
    print("  single thread, XXH128" + " " * 38 + "GB/s   min..max     ratio")
    row(
        f"hash_blocks(buf, {args.block_kib}K)  [engine]",
        e1,
        f"{e1 / c1:.3f} of C",
        verdict(e1 / c1 >= TARGET_VS_C, ">= 0.70"),
        k="engine1",
    )
    row("C loop XXH3_128bits_withSeed, -O3 XXH_INLINE_ALL", c1, "1.00", k="c1")
    row("C loop, standalone process (cross-check)", exe1, f"{exe1 / c1:.2f} of C")
    row("python-xxhash, one call per block", gbs["py1"], f"{gbs['py1'] / c1:.2f} of C", k="py1")
    row(f"xxhsum -b13 -B{bs} (XXH128 w/seed, sample in cache)", xs, f"{xs / c1:.2f} of C" if xs else "")
    print()
    print("  two threads, two buffers at once, XXH128")
    s_e, s_c, s_p = gbs["engine2"] / e1, gbs["c2"] / c1, gbs["py2"] / gbs["py1"]
    row(
        "hash_blocks  [engine]",
        gbs["engine2"],
        f"{s_e:.2f}x 1 thread",
        verdict(s_e >= TARGET_SPEEDUP, ">= 1.6x"),
        k="engine2",
    )
    row("C loop (ctypes, GIL released)", gbs["c2"], f"{s_c:.2f}x 1 thread", k="c2")
    row("C loop, standalone process (cross-check)", exe2, f"{exe2 / exe1:.2f}x 1 thread")
    row("python-xxhash, one call per block", gbs["py2"], f"{s_p:.2f}x 1 thread", k="py2")

    def best(k2: str, k1: str) -> str:
        return f"{spread[k2][1] / spread[k1][1]:.2f}x"

    # On a shared machine a neighbour's job takes the second core for whole rounds; the fastest
    # round of each kind is the least disturbed one.
    print(
        f"  fastest round / fastest round: engine {best('engine2', 'engine1')}, "
        f"C loop {best('c2', 'c1')}; in cache: engine {best('engine2_cache', 'engine1_cache')}, "
        f"C loop {best('c2_cache', 'c1_cache')}"
    )
    print()
    print(
        f"  in cache: a {args.cache_kib} KiB buffer per thread, hashed {small_passes} times"
        " (compute, not memory)"
    )
    e1c, c1c = gbs["engine1_cache"], gbs["c1_cache"]
    row("hash_blocks, 1 thread  [engine]", e1c, f"{e1c / c1c:.3f} of C", k="engine1_cache")
    row("C loop, 1 thread", c1c, "1.00", k="c1_cache")
    row(
        "hash_blocks, 2 threads  [engine]",
        gbs["engine2_cache"],
        f"{gbs['engine2_cache'] / e1c:.2f}x 1 thread",
        k="engine2_cache",
    )
    row("C loop, 2 threads", gbs["c2_cache"], f"{gbs['c2_cache'] / c1c:.2f}x 1 thread", k="c2_cache")
    print()
    print("  compare and zero detection, 1 thread (GB/s of one buffer)")
    row(
        f"diff_blocks(a, copy of a, {args.block_kib}K)  [engine]",
        gbs["diff"],
        "",
        verdict(gbs["diff"] >= TARGET_DIFF_GBS, ">= 5 GB/s"),
        k="diff",
    )
    row(f"zero_blocks(all-zero buffer, {args.block_kib}K)  [engine]", gbs["zero"], "", k="zero")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
