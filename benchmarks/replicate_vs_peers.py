"""replicate of a running QEMU beside what a user would do instead, in one run (issue #11's "Fast").

A 4 GiB qcow2 disk, fully written, attached to a running qemu-system-x86_64 (no guest OS: the
benchmark writes through a second QMP monitor's ``qemu-io``, which goes through the same block
layer as a guest's writes). Between runs about 1% of it changes: 640 writes of 64 KiB (the
bitmap's granularity) at scattered offsets. Rows, medians of --repeat, page cache warm and
cold (``drop_caches`` before each cold run):

  first run          vimgtools.replicate qmp:... (full copy)   beside  qemu-img convert -U -O raw
  incremental        vimgtools.replicate qmp:... (the bitmap)  beside  cat DISK > /dev/null
                                                                and  the same run with --full
                                                                     (every byte compared, the
                                                                     same snapshot path)
  over ssh           the same first and incremental runs into root@127.0.0.1:DIR (a private sshd
                     on a loopback port, both ends on this host), with the bytes sent

Reported for the incremental run: the source bytes QEMU read (``rchar`` of its /proc/PID/io: what
the export pulled from the image, plus the small NBD requests), the bytes vimgtools read (source and
replica), the dirty bytes, their ratio; and the transaction's window (``freeze_seconds`` with a
stand-in agent that answers at once: the window a real guest is frozen for, less its own fsfreeze).

    .venv/bin/python benchmarks/replicate_vs_peers.py [--dir /var/tmp/vimg-bench-rep] [--repeat 3] [--size-gib 4]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from qemu.qmp.legacy import QEMUMonitorProtocol

sys.path.insert(0, str(Path(__file__).parents[1] / "tests" / "sync"))

from loopback_sshd import loopback_sshd

PY = sys.executable
MiB, GiB = 1 << 20, 1 << 30


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


class Agent:
    """Answers guest-ping/freeze/thaw at once: the freeze window measured is vimgtools' own."""

    def __init__(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(str(path))
        self.srv.listen(4)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            conn, _ = self.srv.accept()
            threading.Thread(target=self._client, args=(conn,), daemon=True).start()

    def _client(self, conn: socket.socket) -> None:
        dec, buf = json.JSONDecoder(), ""
        with conn:
            while data := conn.recv(65536):
                buf += data.decode()
                while buf.strip():
                    try:
                        msg, end = dec.raw_decode(buf.lstrip())
                    except ValueError:
                        break
                    buf = buf.lstrip()[end:]
                    ret = 1 if "fsfreeze" in msg["execute"] else {}
                    conn.sendall(json.dumps({"return": ret, "id": msg.get("id")}).encode() + b"\n")


class Vm:
    def __init__(self, disk: Path, where: Path) -> None:
        self.qmp, test = where / "qmp.sock", where / "test.sock"
        for s in (self.qmp, test):
            s.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            ["qemu-system-x86_64", "-S", "-nodefaults", "-display", "none", "-accel", "tcg", "-m", "64",
             "-name", "bench", "-qmp", f"unix:{self.qmp},server=on,wait=off",
             "-qmp", f"unix:{test},server=on,wait=off", "-drive", f"file={disk},format=qcow2,if=none,id=vda"],
        )  # fmt: skip
        while not test.exists():
            time.sleep(0.05)
        self.mon = QEMUMonitorProtocol(str(test))
        self.mon.connect()

    def io(self, command: str) -> None:
        self.mon.cmd("human-monitor-command", **{"command-line": f'qemu-io vda "{command}"'})

    def stop(self) -> None:
        self.mon.close()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait()


def timed(cmd: list[str]) -> tuple[float, dict[str, Any]]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {p.stderr}")
    return dt, (json.loads(p.stdout) if p.stdout.startswith("{") else {})


def file_reads(vm: Vm) -> int:
    """Bytes QEMU has read by system calls so far (its image file, plus the small NBD requests)."""
    for line in Path(f"/proc/{vm.proc.pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise SystemExit("no rchar in /proc/PID/io")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp/vimg-bench-rep"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--size-gib", type=int, default=4)
    args = ap.parse_args()
    if args.dir.exists():
        shutil.rmtree(args.dir)
    args.dir.mkdir(parents=True)
    size = args.size_gib * GiB
    disk = args.dir / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), str(size)], check=True)
    # Fully written, each MiB its own pattern (not all zero: nothing is skipped as a hole).
    cmds = [f"write -P {1 + i % 250} {i * 64}M 64M" for i in range(size // (64 * MiB))]
    argv = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        argv += ["-c", c]
    subprocess.run([*argv, str(disk)],
                   check=True, capture_output=True)  # fmt: skip
    vm = Vm(disk, args.dir)
    daemons = contextlib.ExitStack()
    rsh = daemons.enter_context(loopback_sshd(args.dir / "sshd"))
    agent_sock = args.dir / "qga.sock"
    Agent(agent_sock)
    rep = [PY, "-m", "vimgtools.replicate", "--json", "-q", "--agent", str(agent_sock), f"qmp:{vm.qmp}"]
    rng = random.Random(11)
    clusters = size // (64 * 1024)
    rows: dict[str, list[float]] = {}
    extra: dict[str, list[float]] = {}

    def add(name: str, v: float, into: dict[str, list[float]] = rows) -> None:
        into.setdefault(name, []).append(v)

    try:
        for cold in (False, True):
            tag = "cold" if cold else "warm"
            for r in range(args.repeat):
                dest = args.dir / f"dr-{tag}-{r}"
                if cold:
                    drop_caches()
                dt, out = timed([*rep, str(dest)])
                add(f"{tag} first run: vimgtools.replicate", dt)
                if cold:
                    drop_caches()
                t0 = time.perf_counter()
                subprocess.run(
                    ["qemu-img", "convert", "-U", "-O", "raw", str(disk), str(args.dir / "convert.raw")],
                    check=True,
                )
                add(f"{tag} first run: qemu-img convert -U -O raw", time.perf_counter() - t0)
                (args.dir / "convert.raw").unlink()
                dirty = set(rng.randrange(clusters) for _ in range(640))
                for c in dirty:
                    vm.io(f"write -P {rng.randrange(1, 255)} {c * 65536} 64k")
                dirty_bytes = len(dirty) * 65536
                if cold:
                    drop_caches()
                before = file_reads(vm)
                dt, out = timed([*rep, str(dest)])
                src_read = file_reads(vm) - before
                d = out["disks"][0]
                assert d["mode"] == "incremental", d
                add(f"{tag} incremental: vimgtools.replicate", dt)
                add(f"{tag} incremental: source bytes read / dirty bytes", src_read / dirty_bytes, extra)
                add(
                    f"{tag} incremental: vimgtools bytes read (source + replica) / dirty bytes",
                    d["bytes_read"] / dirty_bytes,
                    extra,
                )
                add(
                    f"{tag} incremental: bytes written / dirty bytes", d["bytes_written"] / dirty_bytes, extra
                )
                add(f"{tag} freeze window (s)", out["freeze_seconds"], extra)
                if cold:
                    drop_caches()
                t0 = time.perf_counter()
                subprocess.run(f"cat {disk} > /dev/null", shell=True, check=True)
                add(f"{tag} incremental: cat DISK > /dev/null", time.perf_counter() - t0)
                for c in list(dirty)[:64]:
                    vm.io(f"write -P 7 {c * 65536} 4k")
                if cold:
                    drop_caches()
                dt, out = timed([*rep, "--full", str(dest)])
                add(f"{tag} incremental: the same with --full (every byte compared)", dt)
                shutil.rmtree(dest)
                # The same over ssh (one replica directory per guest: its bitmaps are that DEST's).
                remote = [*rep, "-e", rsh, "--remote-python", PY, f"root@127.0.0.1:{dest}"]
                if cold:
                    drop_caches()
                dt, out = timed(remote)
                add(f"{tag} first run over ssh: vimgtools.replicate", dt)
                dirty = set(rng.randrange(clusters) for _ in range(640))
                for c in dirty:
                    vm.io(f"write -P {rng.randrange(1, 255)} {c * 65536} 64k")
                if cold:
                    drop_caches()
                dt, out = timed(remote)
                assert out["disks"][0]["mode"] == "incremental", out
                add(f"{tag} incremental over ssh: vimgtools.replicate", dt)
                add(f"{tag} incremental over ssh: bytes sent / dirty bytes",
                    out["disks"][0]["bytes_sent"] / (len(dirty) * 65536), extra)  # fmt: skip
                shutil.rmtree(dest)
    finally:
        vm.stop()
        daemons.close()
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(
        f"\n{args.size_gib} GiB qcow2 disk of a running QEMU, ~1% changed between runs; medians of {args.repeat}\n"
    )
    print("| run | seconds | ratio |")
    print("|---|---|---|")
    for tag in ("warm", "cold"):
        base_first = med[f"{tag} first run: qemu-img convert -U -O raw"]
        base_cat = med[f"{tag} incremental: cat DISK > /dev/null"]
        for k, v in med.items():
            if not k.startswith(tag):
                continue
            base = base_first if "first run" in k else base_cat  # over ssh too: the same references
            print(f"| {k} | {v:.3f} | {v / base:.2f}x |")
    print()
    for k, v in extra.items():
        print(f"- {k}: median {statistics.median(v):.3f} (runs: {', '.join(f'{x:.3f}' for x in v)})")
    os.sync()


if __name__ == "__main__":
    main()
