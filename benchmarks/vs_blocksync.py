"""vimgtools.sync beside blocksync-fast, cat and rsync, warm and cold, local and over ssh, in one run.

The case is sync_vs_peers.py's "changed" one (4 GiB raw, ~60% allocated, 1% of its 64 KiB
blocks changed, half of them in one 4 KiB page, plus one 64 MiB run). blocksync-fast is built
by this script from its public source into a temporary directory (never kept, never in the
repository): ``--blocksync-src`` names a source tree, a git directory (a bare mirror) or a git
URL. Each timing starts from the same old replica (restored outside the timing) and, for the
digest modes, from the previous night's digest / state describing it. "warm": both images
read just before. "cold": both images read (so that whatever caches this machine's disk, a VM
host's page cache, holds the same for every tool), then ``sync; echo 3 >
/proc/sys/vm/drop_caches`` (needs root), then a wait of ``--settle`` seconds where a virtio
balloon reports free pages to the hypervisor: the memory drop_caches freed is handed back to
the host within seconds, and a reader that then takes new pages pays the host's faults (here
`cat SRC` cold took 1.6 s right after the drop, 2.8 s 2 s later, 4.5 s after 4 s, 6.8 s after
8-15 s), as a nightly run on a long-running VM does. "dropped": right after the drop, the
memory just freed still backed by the host (what "cold" was before; it favours a reader that
keeps every page it reads, as cat does).
Rounds run every tool once in turn, so that a busy machine slows all of them alike; the
median of ``--repeat`` rounds is shown, with ratios to the peer doing the same job and to
``cat``, and for vimgtools the wall time beyond the ``seconds`` it reports (start-up and
teardown). ssh goes to a private sshd on 127.0.0.1 (tests/sync/loopback_sshd.py). The
blocksync-fast --sync-writes rows (an fsync after every 2 MiB buffer: minutes each here) run
once, warm. Rows with a forced residency probe ($VIMGTOOLS_CACHE_PROBE) measure the fallbacks:
mincore (kernels before 6.5) and nowait (RWF_NOWAIT, no read-ahead: the reader before issue 14).

    .venv/bin/python benchmarks/vs_blocksync.py --blocksync-src /path/to/blocksync-fast [--repeat 3]
        [--dir /var/tmp/vimg-bench] [--quick] [--only warm|cold|dropped ...] [--settle S] [--no-ssh] [--no-probes]
        [--no-sync-writes] [--json rows.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests" / "sync"))

from loopback_sshd import loopback_sshd

from sync_vs_peers import GiB, MiB, make_changed_case, reset, warm

PY = sys.executable
VIMG = [PY, "-m", "vimgtools.sync", "-q", "--json"]


@contextlib.contextmanager
def built_blocksync(src: str) -> Iterator[Path]:
    """Build blocksync-fast from ``src`` (a tree, a git directory or a git URL) in a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="blocksync-fast-") as tmp:
        tree = Path(tmp) / "src"
        p = Path(src)
        if p.is_dir() and (p / "configure").exists():
            shutil.copytree(p, tree, symlinks=True)
        elif p.is_dir():  # a git directory (bare or not)
            tree.mkdir()
            git_dir = p / ".git" if (p / ".git").exists() else p
            archive = subprocess.run(["git", "--git-dir", str(git_dir), "archive", "HEAD"], check=True,
                                     capture_output=True).stdout  # fmt: skip
            subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
        else:
            subprocess.run(["git", "clone", "-q", "--depth", "1", src, str(tree)], check=True)
        log = Path(tmp) / "build.log"
        with open(log, "w") as out:
            for cmd in (["./configure"], ["make", "-j2"]):
                if subprocess.run(cmd, cwd=tree, stdout=out, stderr=subprocess.STDOUT).returncode:
                    raise SystemExit(
                        f"building blocksync-fast failed ({' '.join(cmd)}): {log.read_text()[-2000:]}"
                    )
        binary = tree / "src" / "blocksync-fast"
        version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
        print(f"built {version.strip()} from {src}", flush=True)
        yield binary


STATES = ("warm", "cold", "dropped")


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def reports_free_pages() -> bool:
    """A virtio balloon with free page reporting (VIRTIO_BALLOON_F_REPORTING, feature bit 5):
    free memory goes back to the hypervisor a few seconds after it is freed."""
    for dev in Path("/sys/bus/virtio/devices").glob("*"):
        with contextlib.suppress(OSError, ValueError):
            if int((dev / "device").read_text(), 16) == 5 and (dev / "features").read_text()[5] == "1":
                return True
    return False


@dataclass
class Tool:
    name: str
    cmd: Callable[[], list[str]]
    prep: Callable[[], None]  # outside the timing, before the cache is warmed or dropped
    peer: str | None = None  # the row doing the same job, for the ratio
    cat: str | None = None  # the physical reference row
    writes: bool = True  # DST must equal SRC afterwards
    env: dict[str, str] = field(default_factory=dict)
    once: bool = False  # one warm run only (blocksync-fast --sync-writes: minutes, an fsync per 2 MiB buffer)
    times: dict[str, list[float]] = field(default_factory=lambda: {c: [] for c in STATES})
    overhead: dict[str, list[float]] = field(default_factory=lambda: {c: [] for c in STATES})
    flush: dict[str, list[float]] = field(default_factory=lambda: {c: [] for c in STATES})


# Timed runs get the environment a user's shell has: without PYTHONDONTWRITEBYTECODE (set in some
# sandboxes), which would make every run compile again, in memory, each module edited since its
# .pyc was written (pip compiles them at install; an editable install writes them on first use).
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def compile_package() -> None:
    """Bytecode for the package as an installed one has it (timed runs then only load .pyc files)."""
    pkg = Path(__file__).resolve().parents[1] / "src" / "vimgtools"
    subprocess.run([PY, "-m", "compileall", "-q", str(pkg)], check=True, env=ENV, stdout=subprocess.DEVNULL)


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, stdout=subprocess.PIPE if cmd[:1] != ["cat"] else subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True, env={**ENV, **env})  # fmt: skip
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)[:200]} failed ({p.returncode}): {p.stderr[-2000:]}")
    return dt, p.stdout or ""


def cpu_busy() -> tuple[float, float]:
    """(non-idle CPU seconds of the whole machine, seconds since boot) from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / tick, time.monotonic()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocksync-src", required=True, help="blocksync-fast's source: a tree, git dir or URL")
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp/vimg-bench"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="1 GiB instead of 4 GiB")
    ap.add_argument("--size-mib", type=int, help="another size (a smoke test of the script: 128)")
    ap.add_argument("--only", choices=STATES, action="append", help="this cache state only (repeatable)")
    ap.add_argument("--settle", type=float, help="seconds to wait after dropping the cache for \"cold\" "
                    "(default: 15 where a virtio balloon reports free pages, else 0)")  # fmt: skip
    ap.add_argument("--no-ssh", action="store_true", help="local rows only")
    ap.add_argument(
        "--no-probes", action="store_true", help="without the rows of the fallback residency probes"
    )
    ap.add_argument(
        "--no-sync-writes",
        action="store_true",
        help="without the blocksync-fast --sync-writes rows (minutes each)",
    )
    ap.add_argument("--json", type=Path, help="write the rows here too")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root: drop_caches, and the private sshd")
    args.dir.mkdir(parents=True, exist_ok=True)
    size = args.size_mib * MiB if args.size_mib else GiB if args.quick else 4 * GiB
    src, old = make_changed_case(args.dir, size)
    dst = args.dir / "bsf-dst.img"
    dig0, dig = args.dir / "bsf-old.digest", args.dir / "bsf.digest"
    state = args.dir / "bsf-vimg.state"
    states = STATES if args.only is None else tuple(c for c in STATES if c in args.only)
    settle = args.settle if args.settle is not None else 15.0 if reports_free_pages() else 0.0
    compile_package()
    busy0 = cpu_busy()
    load0 = Path("/proc/loadavg").read_text().split()[:3]
    with built_blocksync(args.blocksync_src) as bsf, contextlib.ExitStack() as stack:
        dig0.unlink(missing_ok=True)
        subprocess.run([bsf, "--make-digest", "-s", old, "-f", dig0, "--silent"], check=True)
        B = str(bsf)

        def fresh() -> None:
            reset(old, dst)

        def with_digest() -> None:
            reset(old, dst)
            shutil.copyfile(dig0, dig)

        def with_state() -> None:  # the previous night: the state of the old generation, DST as it left it
            reset(old, dst)
            subprocess.run([PY, "-m", "vimgtools.sync", "-q", "--state", state, old, dst], check=True)

        s, d = str(src), str(dst)
        tools = [
            Tool("cat SRC DST > /dev/null", lambda: ["cat", s, d], fresh, writes=False),
            Tool("cat SRC > /dev/null", lambda: ["cat", s], fresh, writes=False),
            Tool("blocksync-fast (direct, memcmp)", lambda: [B, "-s", s, "-d", d, "--silent"], fresh),
            Tool("blocksync-fast --sync-writes (direct)", lambda: [B, "-s", s, "-d", d, "--sync-writes", "--silent"],
                 fresh, once=True),
            Tool("vimgtools.sync", lambda: [*VIMG, s, d], fresh, peer="blocksync-fast (direct, memcmp)",
                 cat="cat SRC DST > /dev/null"),
            Tool("blocksync-fast -f DIGEST (reads SRC only)", lambda: [B, "-s", s, "-d", d, "-f", str(dig), "--silent"],
                 with_digest),
            Tool("blocksync-fast -f DIGEST --sync-writes",
                 lambda: [B, "-s", s, "-d", d, "-f", str(dig), "--sync-writes", "--silent"], with_digest, once=True),
            Tool("vimgtools.sync --state (reads SRC only)", lambda: [*VIMG, "--state", str(state), s, d], with_state,
                 peer="blocksync-fast -f DIGEST (reads SRC only)", cat="cat SRC > /dev/null"),
        ]  # fmt: skip
        probes = [
            ("mincore", "mincore probe: kernels before 6.5"),
            ("nowait", "nowait probe: the old reader"),
        ]
        for probe, what in [] if args.no_probes else probes:
            tools += [
                Tool(f"vimgtools.sync ({what})", lambda: [*VIMG, s, d], fresh, peer="blocksync-fast (direct, memcmp)",
                     cat="cat SRC DST > /dev/null", env={"VIMGTOOLS_CACHE_PROBE": probe}),
                Tool(f"vimgtools.sync --state ({what})", lambda: [*VIMG, "--state", str(state), s, d], with_state,
                     peer="blocksync-fast -f DIGEST (reads SRC only)", cat="cat SRC > /dev/null",
                     env={"VIMGTOOLS_CACHE_PROBE": probe}),
            ]  # fmt: skip
        if not args.no_ssh:
            rsh = stack.enter_context(loopback_sshd(args.dir / "sshd"))
            host = f"127.0.0.1:{d}"

            def delta(sync_writes: str) -> list[str]:
                apply = f"{B} --apply-delta -d {shlex.quote(d)} --silent{sync_writes}"
                make = f"{B} --make-delta -s {shlex.quote(s)} -f {shlex.quote(str(dig))} --silent"
                return ["bash", "-o", "pipefail", "-c", f"{make} | {rsh} 127.0.0.1 {shlex.quote(apply)}"]

            remote = ["-e", rsh, "--remote-python", PY]
            tools += [
                Tool("ssh HOST true (connecting alone)", lambda: [*rsh.split(), "127.0.0.1", "true"], fresh,
                     writes=False),
                Tool("blocksync-fast delta piped through ssh", lambda: delta(""), with_digest),
                Tool("blocksync-fast delta over ssh, --sync-writes", lambda: delta(" --sync-writes"), with_digest,
                     once=True),
                Tool("vimgtools.sync push", lambda: [*VIMG, *remote, s, host], fresh,
                     peer="blocksync-fast delta piped through ssh", cat="cat SRC DST > /dev/null"),
                Tool("vimgtools.sync push --state", lambda: [*VIMG, *remote, "--state", str(state), s, host],
                     with_state, peer="blocksync-fast delta piped through ssh", cat="cat SRC > /dev/null"),
                Tool("rsync --inplace --no-whole-file over ssh",
                     lambda: ["rsync", "--inplace", "--no-whole-file", "-B", "65536", "-e", rsh, s, host], fresh,
                     peer="blocksync-fast delta piped through ssh", cat="cat SRC DST > /dev/null"),
            ]  # fmt: skip
        for rnd in range(args.repeat):
            for cache in states:
                for t in tools:
                    if t.once and (rnd or cache != "warm" or args.no_sync_writes):
                        continue
                    t.prep()
                    warm(src, dst)
                    if cache != "warm":
                        drop_caches()
                    if cache == "cold":
                        time.sleep(settle)
                    dt, out = timed(t.cmd(), t.env)
                    t.times[cache].append(dt)
                    if t.name.startswith("vimgtools"):
                        r = json.loads(out)
                        t.overhead[cache].append(dt - float(r["seconds"]))
                        t.flush[cache].append(float(r.get("seconds_flush", 0.0)))
                    if t.writes and rnd == 0 and subprocess.run(["cmp", "-s", s, d]).returncode:
                        raise SystemExit(f"{t.name}: the replica differs from the source")
                    print(f"  round {rnd + 1} {cache:4} {t.name:50} {dt:7.3f} s", flush=True)
    busy1 = cpu_busy()
    load1 = Path("/proc/loadavg").read_text().split()[:3]
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    ours = ru.ru_utime + ru.ru_stime + sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
    wall = busy1[1] - busy0[1]
    others = max(0.0, (busy1[0] - busy0[0]) - ours) / wall
    byname = {t.name: t for t in tools}

    def med(t: Tool, cache: str) -> float | None:
        return statistics.median(t.times[cache]) if t.times[cache] else None

    def ratio(t: Tool, ref: str | None, cache: str) -> str:
        a, b = med(t, cache), med(byname[ref], cache) if ref else None
        return f"{a / b:.2f}" if a is not None and b else "-"

    def fmt(x: float | None) -> str:
        return f"{x:.3f}" if x is not None else "-"

    print(f"\n{size / GiB:.2g} GiB changed case, medians of {args.repeat}; load average {' '.join(load0)} at the start, "
          f"{' '.join(load1)} at the end; other processes used {others:.2f} of {os.cpu_count()} cores on average\n")  # fmt: skip
    print(f"cold: {settle:g} s after dropping the cache; dropped: right after\n")
    names = "/".join(states)
    print("| tool | " + " | ".join(f"{c} s" for c in states) + " | " + " | ".join(f"{c} x peer" for c in states)
          + " | " + " | ".join(f"{c} x cat" for c in states) + f" | wall - seconds ({names}) | seconds_flush ({names}) |")  # fmt: skip
    print("|---|" + "---|" * (3 * len(states) + 2))
    rows = []
    for t in tools:
        over = "/".join(f"{statistics.median(t.overhead[c]):.3f}" for c in states if t.overhead[c]) or "-"
        flush = "/".join(f"{statistics.median(t.flush[c]):.3f}" for c in states if t.flush[c]) or "-"
        cells = [fmt(med(t, c)) for c in states] + [ratio(t, t.peer, c) for c in states]
        cells += [ratio(t, t.cat, c) for c in states]
        print(f"| {t.name} | {' | '.join(cells)} | {over} | {flush} |")
        rows.append({"tool": t.name, "times": t.times, "overhead": t.overhead, "flush": t.flush, "peer": t.peer,
                     "cat": t.cat})  # fmt: skip
    if args.json:
        args.json.write_text(
            json.dumps(
                {"rows": rows, "others_cores": others, "load": [load0, load1], "settle": settle}, indent=1
            )
        )
    for p in (dst, dig, dig0, state):
        p.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
