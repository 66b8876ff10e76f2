"""Local sync beside the tools a user would pick instead, in one run, page cache warm.

Cases (docs/sync.md has the results):
  changed    4 GiB raw image, ~60% allocated, 1% of its 64 KiB blocks changed at random
             (half of them in a single 4 KiB page) plus one 64 MiB run
  identical  the same image, replica already equal
  sparse64   64 GiB sparse image holding 1 GiB of data, against a 1 GiB dense image (dense1)

Tools: vimgtools.sync, rsync --inplace --no-whole-file, cp --sparse=always, and the physical
reference `cat SRC DST > /dev/null` (reading both once). Each timing starts from the same old
replica (restored outside the timing) and a warm cache; the median of --repeat runs is shown,
with peak RSS (GNU time) and the time of a `sync` right after (what durability
costs the tools that do not fsync; vimgtools.sync fsyncs its journal and the replica itself).

    .venv/bin/python benchmarks/sync_vs_peers.py [--dir /var/tmp/vimg-bench] [--repeat 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from vimgtools.image import Image

GiB = 1 << 30
MiB = 1 << 20
PY = sys.executable
LAST_JSON: dict[str, object] = {}  # the --json summary of the last vimgtools run


def write_random(path: Path, size: int, extents: list[tuple[int, int]], seed: int) -> None:
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for off, length in extents:
            f.seek(off)
            done = 0
            while done < length:
                n = min(16 * MiB, length - done)
                f.write(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
                done += n


def make_changed_case(d: Path, size: int) -> tuple[Path, Path]:
    """Base image (the old replica) and the source with the changes applied."""
    old, src = d / f"changed-{size >> 30}g-old.img", d / f"changed-{size >> 30}g-src.img"
    if old.exists() and src.exists():
        return src, old
    rng = np.random.default_rng(1)
    extents = [(i * MiB, MiB) for i in range(size // MiB) if rng.random() < 0.6]
    write_random(old, size, merge(extents), seed=2)
    subprocess.run(["cp", "--sparse=always", old, src], check=True)
    with open(src, "r+b") as f:
        nblocks = size // (64 << 10)
        for b in rng.choice(nblocks, nblocks // 100, replace=False):
            page = rng.integers(0, 16)
            f.seek(int(b) * (64 << 10) + (int(page) * 4096 if rng.random() < 0.5 else 0))
            f.write(rng.integers(0, 256, 4096 if rng.random() < 0.5 else 64 << 10, dtype=np.uint8).tobytes())
        f.seek(int(rng.integers(0, size - 64 * MiB)) // 4096 * 4096)
        f.write(rng.integers(0, 256, 64 * MiB, dtype=np.uint8).tobytes())
    return src, old


def merge(extents: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for off, n in extents:
        if out and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((off, n))
    return out


def make_sparse_case(d: Path, size: int, data: int) -> tuple[Path, Path]:
    """Source with ``data`` bytes spread over ``size`` and an old replica differing in 1% of it."""
    src, old = d / f"sparse-{size >> 30}g-src.img", d / f"sparse-{size >> 30}g-old.img"
    if src.exists() and old.exists():
        return src, old
    pieces = 64
    step = size // pieces
    extents = [(i * step, data // pieces) for i in range(pieces)]
    write_random(old, size, extents, seed=3)
    subprocess.run(["cp", "--sparse=always", old, src], check=True)
    rng = np.random.default_rng(4)
    with open(src, "r+b") as f:
        for off, n in extents:
            f.seek(off + int(rng.integers(0, n // 4096)) * 4096)
            f.write(rng.integers(0, 256, n // 100 // 4096 * 4096, dtype=np.uint8).tobytes())
    return src, old


def run(cmd: list[str]) -> tuple[float, float, int]:
    """(seconds, seconds of the `sync` that makes its writes durable, peak RSS bytes) of one command."""
    t0 = time.perf_counter()
    out = subprocess.PIPE if "--json" in cmd else subprocess.DEVNULL  # cat's output goes to /dev/null
    p = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], stdout=out, stderr=subprocess.PIPE)
    if "--json" in cmd and p.returncode == 0:
        LAST_JSON.update(json.loads(p.stdout))
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed: {p.stderr.decode()}")
    t1 = time.perf_counter()
    os.sync()  # peers do not fsync; this is what durability costs them
    flush = time.perf_counter() - t1
    return dt, flush, int(p.stderr.decode().split()[-1]) * 1024


def reset(old: Path, dst: Path) -> None:
    subprocess.run(["cp", "--sparse=always", "--reflink=auto", old, dst], check=True)
    os.sync()


def warm(*paths: Path) -> None:
    """Read each file once, as `cat` would, so its pages (holes included) are cached. An image too
    big for the page cache gets only its data read: reading 64 GiB of holes would evict the data."""
    for p in paths:
        if p.stat().st_size <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4:
            subprocess.run(["cat", p], stdout=subprocess.DEVNULL, check=True)
            continue
        with Image(p) as img:  # the library's SEEK_DATA map, not a second copy of it
            for start, n in img.data_extents():
                for off in range(start, start + n, 16 * MiB):
                    os.pread(img.fd, min(16 * MiB, start + n - off), off)


TOOLS = {
    "cat SRC DST (reference)": lambda s, d: ["cat", str(s), str(d)],
    "vimgtools.sync": lambda s, d: [PY, "-m", "vimgtools.sync", "-q", "--json", str(s), str(d)],
    "rsync --inplace --no-whole-file": lambda s, d: [
        "rsync",
        "--inplace",
        "--no-whole-file",
        "-B",
        "65536",
        str(s),
        str(d),
    ],
    "cp --sparse=always": lambda s, d: ["cp", "--sparse=always", str(s), str(d)],
}


def bench_case(name: str, src: Path, old: Path, work: Path, repeat: int, tools: list[str]) -> list[dict]:
    dst = work / "dst.img"
    rows = []
    for tool in tools:
        times, durable, flush, rss = [], [], [], 0
        for _ in range(repeat):
            reset(old, dst)
            warm(src, dst)
            dt, sync_s, peak = run(TOOLS[tool](src, dst))
            times.append(dt)
            durable.append(dt + sync_s)
            flush.append(float(LAST_JSON.get("seconds_flush", 0.0)) if tool == "vimgtools.sync" else 0.0)
            rss = max(rss, peak)
        if tool != "cat SRC DST (reference)" and subprocess.run(["cmp", "-s", src, dst]).returncode:
            raise SystemExit(f"{tool}: replica differs from source in case {name}")
        row = {
            "case": name,
            "tool": tool,
            "median_s": statistics.median(times),
            "durable_s": statistics.median(durable),
            "rss": rss,
            "flush_s": statistics.median(flush),
        }
        rows.append(row)
        print(f"  {name:10} {tool:34} {row['median_s']:7.3f} s  +sync {row['durable_s']:7.3f} s", flush=True)
    ref = rows[0]["median_s"]
    for r in rows:
        r["x_cat"] = r["median_s"] / ref
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp/vimg-bench"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="1 GiB instead of 4 GiB, no 64 GiB case")
    ap.add_argument("--json", type=Path, help="write the rows here too")
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    size = GiB if args.quick else 4 * GiB
    rows = []
    src, old = make_changed_case(args.dir, size)
    all_tools = list(TOOLS)
    rows += bench_case("changed", src, old, args.dir, args.repeat, all_tools)
    rows += bench_case("identical", src, src, args.dir, args.repeat, all_tools)
    if not args.quick:
        s64, o64 = make_sparse_case(args.dir, 64 * GiB, GiB)
        s1, o1 = make_sparse_case(args.dir, GiB, GiB)
        rows += bench_case("sparse64", s64, o64, args.dir, args.repeat, all_tools[:2])
        rows += bench_case("dense1", s1, o1, args.dir, args.repeat, all_tools[:2])
    print()
    print(
        "| case | tool | median s | x cat | of it flushing (commit, apply, fsync) | with `sync` after, s | peak RSS |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        fl = f"{r['flush_s']:.3f}" if r["tool"] == "vimgtools.sync" else "-"
        print(
            f"| {r['case']} | {r['tool']} | {r['median_s']:.3f} | {r['x_cat']:.2f} | {fl} | "
            f"{r['durable_s']:.3f} | {r['rss'] / MiB:.0f} MiB |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    (args.dir / "dst.img").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
