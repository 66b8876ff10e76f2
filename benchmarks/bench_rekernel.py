"""rekernel against virt-customize doing the same change, in the same run, on copies of the same guest.

    LIBGUESTFS_BACKEND_SETTINGS=force_tcg .venv/bin/python benchmarks/bench_rekernel.py [--json] [--boot]

Uses the cached test guest (GRUB 2, usrmerged Debian 12) and Debian's cloud kernel with an
initramfs (tests/rekernel/guestbuild.py builds them on first use). Both tools: copy the kernel
files to /boot, move the modules to /boot/modules and link /usr/lib/modules to it, copy the new
modules, depmod, update-grub, make the new kernel the default. virt-customize has no preflight,
no verification and writes DISK in place (no all-or-nothing); rekernel does all three, runs depmod
on the host, and commits through the journal. Reported: wall time, and for rekernel its own split
(appliance launch vs work).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "rekernel"))

import guestbuild  # noqa: E402


def virt_customize(disk: Path, bootdir: Path, version: str) -> float:
    files = [p for p in bootdir.iterdir() if p.is_file()]
    argv = ["virt-customize", "-q", "--format", "raw", "-a", str(disk), "--no-network"]
    for f in files:
        argv += ["--copy-in", f"{f}:/boot"]
    argv += [
        "--mkdir",
        "/boot/modules",
        "--run-command",
        "for d in /usr/lib/modules/*; do mv $d /boot/modules/; done; rmdir /usr/lib/modules; "
        "ln -s /boot/modules /usr/lib/modules",
        "--copy-in",
        f"{bootdir / 'modules' / version}:/boot/modules",
        "--run-command",
        f"depmod -a {version}",
        "--run-command",
        "sed -i 's/^GRUB_DEFAULT=.*/GRUB_DEFAULT=saved/' /etc/default/grub && update-grub",
        "--run-command",
        "grub-editenv /boot/grub/grubenv set "
        f'saved_entry="$(grep -o "gnulinux-advanced-[^\']*" /boot/grub/grub.cfg | head -1)>'
        f'$(grep -o "gnulinux-{version}-advanced-[^\']*" /boot/grub/grub.cfg | head -1)"',
    ]
    t0 = time.monotonic()
    subprocess.run(argv, check=True)
    return time.monotonic() - t0


def rekernel(disk: Path, bootdir: Path) -> tuple[float, dict[str, float]]:
    t0 = time.monotonic()
    p = subprocess.run(
        [sys.executable, "-m", "vimgtools.rekernel", "--json", str(disk), "--from", str(bootdir)],
        check=True,
        capture_output=True,
        text=True,
    )
    wall = time.monotonic() - t0
    return wall, json.loads(p.stdout)["seconds"]


def main(argv: list[str]) -> int:
    os.environ.setdefault("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")
    image = guestbuild.guest_image("grub2")
    bootdir = guestbuild.cloud_bootdir(initramfs=True)
    (k,) = bootdir.glob("vmlinuz-*")
    version = k.name[len("vmlinuz-") :]
    with tempfile.TemporaryDirectory(dir=os.environ.get("VIMG_BENCH_DIR", "/var/tmp")) as tmp:
        a = Path(tmp) / "a.raw"
        b = Path(tmp) / "b.raw"
        for d in (a, b):
            subprocess.run(["cp", "--sparse=always", str(image), str(d)], check=True)
        vc = virt_customize(a, bootdir, version)
        rk, split = rekernel(b, bootdir)
        booted = {}
        if "--boot" in argv:  # both results must boot the new kernel (one qemu at a time)
            from qemuboot import boot

            booted = {name: boot(d)["KERNEL"] for name, d in (("virt_customize", a), ("rekernel", b))}
    result = {
        "virt_customize_seconds": round(vc, 1),
        "rekernel_seconds": round(rk, 1),
        "rekernel_split": split,
        "kernel": version,
        "backend": os.environ["LIBGUESTFS_BACKEND_SETTINGS"],
        "booted": booted,
    }
    if "--json" in argv:
        print(json.dumps(result))
    else:
        print(f"virt-customize (copy-in, link, run-command; no checks, in place): {vc:6.1f} s")
        print(
            f"vimgtools.rekernel (preflight, verify, journal commit):           {rk:6.1f} s  "
            f"(appliance launch {split.get('launch', 0):.1f} s, inspect {split.get('inspect', 0):.1f} s, "
            f"apply {split.get('apply', 0):.1f} s, verify {split.get('verify', 0):.1f} s, "
            f"commit {split.get('commit', 0):.1f} s)"
        )
        if booted:
            print(f"booted kernels: {booted}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
