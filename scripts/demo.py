#!/usr/bin/env python3
"""`make demo`: replicate a sample guest disk the way a nightly job would, and show what is kept safe.

In a temporary directory: make a sparse 512 MiB "guest disk", copy it to a replica,
change the source as a running guest does (writes, a discard, a write into a hole),
then run the real commands: a dry run, a sync with an undo file, a sync killed with
kill -9 halfway and resumed, a rollback, a signature/delta round trip, and a push
through a remote shell (run locally here). Each step prints the command it runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

MiB = 1 << 20
PY = sys.executable


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def run(*args: str | Path, show: bool = True) -> dict[str, Any]:
    """Run `python -m vimgtools.sync ARGS --json`, print the command and the summary line."""
    cmd = [PY, "-m", "vimgtools.sync", *map(str, args), "--json"]
    if show:
        print("$ python -m vimgtools.sync " + " ".join(shlex.quote(str(a)) for a in args), flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True)
    if show and p.stderr.strip():
        print("  " + p.stderr.strip().replace("\n", "\n  "))
    if p.returncode != 0:
        raise SystemExit(f"demo: the command failed with exit code {p.returncode}")
    return json.loads(p.stdout) if p.stdout.strip() else {}


def sha(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()[:16]


def allocated(path: Path) -> str:
    return f"{os.stat(path).st_blocks * 512 / MiB:.0f} MiB allocated of {path.stat().st_size / MiB:.0f} MiB"


def make_disk(path: Path, size: int, rng: np.random.Generator) -> None:
    with path.open("wb") as f:
        f.truncate(size)
        for start in range(0, size, 32 * MiB):  # 40% data in 4 MiB extents, the rest holes
            for k in range(0, 32 * MiB, 4 * MiB):
                if rng.random() < 0.4:
                    f.seek(start + k)
                    f.write(rng.integers(0, 256, 4 * MiB, dtype=np.uint8).tobytes())


def night_of_work(path: Path, rng: np.random.Generator, pages: int) -> None:
    """What a guest does to its disk in a day: scattered writes, a discarded file, a new file."""
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    data_at = os.lseek(fd, 8 * MiB, os.SEEK_DATA)  # where the guest had a file it now deletes
    os.close(fd)
    with path.open("r+b") as f:
        for page in rng.choice(size // 4096, pages, replace=False):
            f.seek(int(page) * 4096)
            f.write(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
        f.seek(data_at)
        f.write(bytes(2 * MiB))  # a deleted file, fstrim'd: zeros where there was data
        f.seek(size - 3 * MiB)
        f.write(rng.integers(0, 256, MiB, dtype=np.uint8).tobytes())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args()
    rng = np.random.default_rng(2026)
    tmp = Path(tempfile.mkdtemp(prefix="vimgtools-demo-"))
    os.chdir(tmp)
    src, replica = Path("guest.img"), Path("replica.img")

    say(f"a {args.size_mib} MiB sparse guest disk in {tmp}")
    make_disk(src, args.size_mib * MiB, rng)
    print(f"guest.img: {allocated(src)}")

    say("the first copy: the replica is created sparse, holes are never read")
    r = run(src, replica)
    print(f"replica.img: {allocated(replica)}; identical: {sha(src) == sha(replica)}")

    say("a day in the guest: scattered 4 KiB writes, a discard, a new file")
    night_of_work(src, rng, pages=300)
    r = run("--dry-run", src, replica)
    print(f"a sync would write {r['changed']} blocks of 4 KiB ({r['zero']} of them become holes)")

    say("the nightly sync, keeping the old blocks in an undo file")
    r = run("--undo", "night1.undo", "--verify", src, replica)
    print(
        f"written into the replica: {int(r['bytes_written']) / MiB:.2f} MiB, "
        f"journaled first: {int(r['journal_bytes']) / MiB:.2f} MiB; verified: {r['verified']}"
    )

    say("kill -9 in the middle of the next sync: the replica stays as it was, the next run resumes")
    night_of_work(src, rng, pages=30000)
    generation2 = sha(replica)
    p = subprocess.Popen([PY, "-m", "vimgtools.sync", "-q", str(src), str(replica)])
    journal = Path("replica.img.vimg-journal")
    deadline = time.monotonic() + 30
    while p.poll() is None and not (journal.exists() and journal.stat().st_size > 40 * MiB):
        if time.monotonic() > deadline:
            break
        time.sleep(0.002)
    if p.poll() is None:
        p.send_signal(signal.SIGKILL)
        p.wait()
        print(f"killed; replica unchanged: {sha(replica) == generation2}; journal left: {journal.exists()}")
        r = run(src, replica)
        print(f"resumed from byte {r['resumed_from']}; identical now: {sha(src) == sha(replica)}")
    else:
        print("(the sync finished before it could be killed on this machine)")

    say("a bad night: the source was damaged (say, ransomware) and the damage was replicated")
    good = sha(replica)
    night_of_work(src, rng, pages=500)
    run("--undo", "bad-night.undo", src, replica)
    run("--rollback", replica, "--undo", "bad-night.undo")
    print(f"replica back to the last good generation: {sha(replica) == good}")

    say("no network between the hosts: signature, delta, apply")
    night_of_work(src, rng, pages=200)
    run("--signature", replica, "-o", "replica.sig")
    r = run(src, "--write-delta", "night.delta", "--against", "replica.sig")
    print(f"delta: {Path('night.delta').stat().st_size / MiB:.2f} MiB for {r['changed']} changed blocks")
    run("--apply-delta", "night.delta", replica)
    print(f"identical: {sha(src) == sha(replica)}")

    say("to another host: a push through a remote shell (here a stand-in for ssh that runs locally)")
    rsh = tmp / "local-rsh"
    rsh.write_text('#!/bin/sh\nshift\nexec sh -c "$*"\n')  # like ssh: drop the host, run the command line
    rsh.chmod(0o755)
    night_of_work(src, rng, pages=100)
    r = run("--rsh", rsh, "--remote-python", PY, src, f"dr-host:{tmp / 'replica.img'}")
    print(
        f"sent {int(r['bytes_sent']) / 1024:.0f} KiB, received {int(r['bytes_received']) / 1024:.0f} KiB "
        f"(the replica's block digests); identical: {sha(src) == sha(replica)}"
    )
    say("with ssh it is: python -m vimgtools.sync guest.img root@dr-host:/srv/replica.img")

    say("a qcow2 guest (libvirt's default): its view into a raw replica, and into a qcow2 one")
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(src), "guest.qcow2"], check=True)
    night_of_work(src, rng, pages=50)
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(src), "guest.qcow2"], check=True)
    r = run("guest.qcow2", replica)
    r = run("guest.qcow2", "replica.qcow2")
    same = subprocess.run(["qemu-img", "compare", "-q", "guest.qcow2", "replica.qcow2"]).returncode == 0
    print(
        f"replica.qcow2: {allocated(Path('replica.qcow2'))} (guest.qcow2: {allocated(Path('guest.qcow2'))}), "
        f"created {r['created']}; same guest view: {same}"
    )

    if args.keep:
        print(f"\nkept {tmp}")
    else:
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()


if __name__ == "__main__":
    main()
