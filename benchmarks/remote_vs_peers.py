"""Remote sync over a real ssh to 127.0.0.1, beside rsync over ssh, in one run (page cache warm).

The case is sync_vs_peers.py's "changed" one (4 GiB, ~60% allocated, 1% of 64 KiB blocks
changed plus a 64 MiB run). A private sshd is started on a loopback port. Each timing
starts from the same old replica; medians of --repeat runs. Bytes on the wire are what
each tool reports (vimgtools: --json bytes_sent + bytes_received; rsync: --stats).

    .venv/bin/python benchmarks/remote_vs_peers.py [--dir /var/tmp/vimg-bench] [--repeat 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests" / "sync"))

from loopback_sshd import loopback_sshd

from sync_vs_peers import GiB, MiB, make_changed_case, reset, warm

PY = sys.executable


def timed(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.DEVNULL if cmd[0] in ("cat", "ssh") else subprocess.PIPE
    p = subprocess.run(cmd, stdout=out, stderr=subprocess.PIPE, text=True)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed: {p.stderr}")
    return dt, p.stdout or ""


def rsync_wire(out: str) -> int:
    sent = re.search(r"Total bytes sent: ([\d,]+)", out)
    recv = re.search(r"Total bytes received: ([\d,]+)", out)
    return sum(int(m.group(1).replace(",", "")) for m in (sent, recv) if m)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp/vimg-bench"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="1 GiB instead of 4 GiB")
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    size = GiB if args.quick else 4 * GiB
    src, old = make_changed_case(args.dir, size)
    dst = args.dir / "remote-dst.img"
    state = args.dir / "remote.state"
    # What truly changed, in 4 KiB pages, as the local sync counts it (dry run).
    probe = json.loads(subprocess.run([PY, "-m", "vimgtools.sync", "-n", "--json", "-q", str(src), str(old)],
                                      capture_output=True, text=True, check=True).stdout)  # fmt: skip
    changed = probe["changed"] * 4096
    with loopback_sshd(args.dir / "sshd") as rsh:
        host = f"127.0.0.1:{dst}"
        gcm = f"{rsh} -c aes128-gcm@openssh.com"  # the cipher a user can pick (-e); ssh's default is chacha20
        # A shared connection (ssh -M), as for a night of syncs to one host: no handshake per run.
        sock = args.dir / "sshd" / "control.sock"
        sock.unlink(missing_ok=True)
        subprocess.run([*rsh.split(), "-M", "-S", str(sock), "-o", "ControlPersist=600", "-N", "-f", "127.0.0.1"],
                       check=True)  # fmt: skip
        shared = f"{rsh} -S {sock}"
        tools = {
            "cat SRC DST (local reference)": lambda: ["cat", str(src), str(old)],
            "ssh HOST true (connecting alone)": lambda: [*rsh.split(), "127.0.0.1", "true"],
            "vimgtools.sync push": lambda: [PY, "-m", "vimgtools.sync", "--json", "-q", "-e", rsh,
                                            "--remote-python", PY, str(src), host],
            "vimgtools.sync push --state": lambda: [PY, "-m", "vimgtools.sync", "--json", "-q", "-e", rsh,
                                                    "--remote-python", PY, "--state", str(state), str(src), host],
            "vimgtools.sync push, aes128-gcm": lambda: [PY, "-m", "vimgtools.sync", "--json", "-q", "-e", gcm,
                                                     "--remote-python", PY, str(src), host],
            "vimgtools.sync push --state, aes128-gcm": lambda: [PY, "-m", "vimgtools.sync", "--json", "-q", "-e",
                                                             gcm, "--remote-python", PY, "--state", str(state),
                                                             str(src), host],
            "vimgtools.sync push --state, shared connection": lambda: [PY, "-m", "vimgtools.sync", "--json", "-q",
                                                                    "-e", shared, "--remote-python", PY, "--state",
                                                                    str(state), str(src), host],
            "rsync --inplace --no-whole-file over ssh": lambda: ["rsync", "--inplace", "--no-whole-file",
                                                                  "-B", "65536", "--stats", "-e", rsh,
                                                                  str(src), host],
        }  # fmt: skip
        rows = []
        for name, cmd in tools.items():
            times, connects, wire, sig = [], [], 0, 0
            for _ in range(args.repeat):
                reset(old, dst)
                if "--state" in name:
                    # The previous night: the state of the old generation, replica as it left it.
                    subprocess.run([PY, "-m", "vimgtools.sync", "-q", "--state", str(state), str(old), str(dst)],
                                   check=True)  # fmt: skip
                warm(src, dst)
                dt, out = timed(cmd())
                times.append(dt)
                if name.startswith("vimgtools"):
                    r = json.loads(out)
                    connects.append(r["seconds_connect"])
                    wire = r["bytes_sent"] + r["bytes_received"]
                    sig = r["bytes_received"] if "--state" not in name else 0
                elif name.startswith("rsync"):
                    wire = rsync_wire(out)
            if not name.startswith(("cat", "ssh")) and subprocess.run(["cmp", "-s", src, dst]).returncode:
                raise SystemExit(f"{name}: replica differs")
            connect = statistics.median(connects) if connects else None
            rows.append({"tool": name, "median_s": statistics.median(times), "wire": wire, "sig": sig,
                         "connect": connect})  # fmt: skip
            print(f"  {name:42} {statistics.median(times):7.3f} s  wire {wire / MiB:8.1f} MiB", flush=True)
        subprocess.run([*rsh.split(), "-S", str(sock), "-O", "exit", "127.0.0.1"], capture_output=True)
    ref = rows[0]["median_s"]
    print(f"\nchanged 4 KiB pages: {changed / MiB:.1f} MiB\n")
    print("| tool | median s | x cat (local) | of which connecting (s) | bytes on the wire | wire / (changed + 1.1 x digests) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for r in rows:
        budget = changed + 1.1 * r["sig"]
        ratio = f"{r['wire'] / budget:.3f}" if r["wire"] else "-"
        connect = f"{r['connect']:.3f}" if r["connect"] is not None else "-"
        print(
            f"| {r['tool']} | {r['median_s']:.3f} | {r['median_s'] / ref:.2f} | {connect} | {r['wire'] / MiB:.1f} MiB "
            f"| {ratio} |"
        )


if __name__ == "__main__":
    main()
