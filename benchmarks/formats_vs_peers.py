"""qcow2 as SRC or DST, beside raw->raw and qemu-img, in one run (page cache warm).

The case is sync_vs_peers.py's "changed" one (4 GiB, ~60% allocated, 1% of 64 KiB blocks
changed plus a 64 MiB run), converted to qcow2 with `qemu-img convert -O qcow2` (old
replica and new source both). Rows, each from the same old replica, medians of --repeat:

  vimgtools raw -> raw          the reference: the same content without a format
  vimgtools qcow2 -> raw        the guest's view into a raw replica (a DR host's LV)
  vimgtools qcow2 -> qcow2      into a qcow2 replica (kept sparse)
  qemu-img convert -n           what qemu-img offers: rewrites every allocated byte
  qemu-img compare              stops at the first difference: timed on two identical images

Then the NBD path's read throughput (every data extent of the qcow2 read through its
export, in-process) beside a direct read of the raw file with the same content.

    .venv/bin/python benchmarks/formats_vs_peers.py [--dir /var/tmp/vimg-bench] [--repeat 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from sync_vs_peers import GiB, MiB, make_changed_case, warm
from vimgtools.image import Image
from vimgtools.images import open_image

PY = sys.executable


def convert(raw: Path, out: Path) -> Path:
    if not out.exists():
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(out)], check=True)
    return out


def reset(old: Path, dst: Path) -> None:
    subprocess.run(["cp", "--sparse=always", str(old), str(dst)], check=True)
    subprocess.run(["sync"], check=True)


def timed(cmd: list[str]) -> tuple[float, float, dict[str, object]]:
    """(seconds, seconds with the `sync` that makes its writes durable, its --json) of one command."""
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {p.stderr}")
    subprocess.run(["sync"], check=True)  # qemu-img does not flush; vimgtools.sync did already
    out = json.loads(p.stdout) if p.stdout.startswith("{") else {}
    return dt, time.perf_counter() - t0, out


def same(a: Path, b: Path) -> bool:
    return subprocess.run(["qemu-img", "compare", "-q", str(a), str(b)]).returncode == 0


def read_all(img: Image) -> tuple[int, float]:
    buf = memoryview(bytearray(4 * MiB))
    t0, n = time.perf_counter(), 0
    for start, length in img.data_extents():
        for off in range(start, start + length, len(buf)):
            m = min(len(buf), start + length - off)
            n += img.read_into(buf[:m], off)[0]
    return n, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp/vimg-bench"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="1 GiB instead of 4 GiB")
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    size = GiB if args.quick else 4 * GiB
    src_raw, old_raw = make_changed_case(args.dir, size)
    src_q = convert(src_raw, src_raw.with_suffix(".qcow2"))
    old_q = convert(old_raw, old_raw.with_suffix(".qcow2"))
    dst_raw, dst_q = args.dir / "fmt-dst.img", args.dir / "fmt-dst.qcow2"
    sync = [PY, "-m", "vimgtools.sync", "-q", "--json"]
    rows: list[tuple[str, Path, Path, Path, list[str]]] = [
        ("vimgtools raw -> raw", src_raw, old_raw, dst_raw, [*sync, str(src_raw), str(dst_raw)]),
        ("vimgtools qcow2 -> raw", src_q, old_raw, dst_raw, [*sync, str(src_q), str(dst_raw)]),
        ("vimgtools qcow2 -> qcow2", src_q, old_q, dst_q, [*sync, str(src_q), str(dst_q)]),
        ("qemu-img convert -n (-> raw)", src_q, old_raw, dst_raw,
         ["qemu-img", "convert", "-n", "-f", "qcow2", "-O", "raw", str(src_q), str(dst_raw)]),
        ("qemu-img convert -n (-> qcow2)", src_q, old_q, dst_q,
         ["qemu-img", "convert", "-n", "-f", "qcow2", "-O", "qcow2", str(src_q), str(dst_q)]),
    ]  # fmt: skip
    with Image(src_raw) as raw:
        data_bytes = sum(n for _, n in raw.data_extents())  # what qemu-img convert writes again
    results = []
    for name, src, old, dst, cmd in rows:
        times, durable, written = [], [], data_bytes
        for _ in range(args.repeat):
            reset(old, dst)
            warm(src, dst)
            dt, dur, out = timed(cmd)
            times.append(dt)
            durable.append(dur)
            written = int(out.get("bytes_written", written))  # type: ignore[call-overload]
        if not same(src, dst):
            raise SystemExit(f"{name}: the replica differs from the source")
        results.append((name, statistics.median(times), statistics.median(durable), written))
        print(f"  {name:34} {statistics.median(times):7.3f} s", flush=True)
    times, durable = [], []
    for _ in range(args.repeat):
        warm(src_q, src_raw)
        dt, dur, _ = timed(["qemu-img", "compare", "-q", str(src_q), str(src_raw)])
        times.append(dt)
        durable.append(dur)
    results.append(
        ("qemu-img compare (identical images)", statistics.median(times), statistics.median(durable), 0)
    )
    ref = results[0][1]
    print("\n| run | median s | x raw->raw | with `sync` after, s | bytes written |\n|---|---|---|---|---|")
    for name, t, dur, w in results:
        print(f"| {name} | {t:.3f} | {t / ref:.2f} | {dur:.3f} | {w >> 20} MiB |")
    warm(src_q, src_raw)
    with Image(src_raw) as raw, open_image(src_q) as q:
        n_raw, t_raw = read_all(raw)
        n_q, t_q = read_all(q)
    print(
        f"\nread throughput, warm: raw file directly {n_raw / t_raw / 1e9:.2f} GB/s; "
        f"qcow2 through NBD {n_q / t_q / 1e9:.2f} GB/s ({n_q >> 20} MiB of data, one thread, 4 MiB requests)"
    )


if __name__ == "__main__":
    main()
