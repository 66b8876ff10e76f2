"""Which accelerator to boot with: KVM where it really runs a kernel, else TCG.

``/dev/kvm`` existing is not enough: under nested virtualisation KVM can start a guest and then hang
it for ever (on our build machines SeaBIOS runs, and a Linux kernel stops right after its real-mode
setup). So the probe boots the host's own kernel under KVM, with no disk, and waits a few seconds
for its ``Linux version`` line on the serial console; anything else (no device, no permission, qemu
refusing, silence) means TCG. Without a kernel on the host the probe boots SeaBIOS to its boot
attempt instead (a weaker check: it runs no 64-bit code).
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vimgtools.drill.qemu import QEMU, Process

log = logging.getLogger("vimgtools.drill")

KVM_DEVICE = Path("/dev/kvm")
PROBE_SECONDS = 6.0
_KERNEL_GLOBS = ("/boot/vmlinuz-*", "/vmlinuz", "/boot/vmlinuz")


@dataclass(frozen=True)
class Probe:
    """The probe's answer: ``accel`` to use and why."""

    accel: str
    reason: str
    seconds: float


def host_kernel() -> Path | None:
    """A kernel image of the host to probe with (the newest /boot/vmlinuz-*), or None."""
    found: list[Path] = []
    for pattern in _KERNEL_GLOBS:
        found += sorted(Path("/").glob(pattern.lstrip("/")), key=lambda p: p.stat().st_mtime)
    readable = [p.resolve() for p in found if p.is_file() and os.access(p, os.R_OK)]
    return max(readable, key=lambda p: p.stat().st_mtime) if readable else None


def probe_kvm(
    *,
    qemu: str = QEMU,
    device: Path = KVM_DEVICE,
    timeout: float = PROBE_SECONDS,
    kernel: Path | bool | None = True,
) -> Probe:
    """Probe KVM with a time limit; ``kernel=True`` finds the host's kernel, ``None``/``False`` skips it."""
    t0 = time.monotonic()

    def answer(accel: str, reason: str) -> Probe:
        p = Probe(accel, reason, time.monotonic() - t0)
        log.debug("accel probe: %s (%s, %.1f s)", accel, reason, p.seconds)
        return p

    if not device.exists():
        return answer("tcg", f"{device} does not exist")
    if not os.access(device, os.R_OK | os.W_OK):
        return answer("tcg", f"{device} is not readable and writable by this user")
    image = host_kernel() if kernel is True else (kernel or None)
    with tempfile.TemporaryDirectory(prefix="vimg-drill-probe-") as tmp:
        out = Path(tmp) / "console.log"
        args: Sequence[str] = [
            qemu,
            "-machine",
            "pc,accel=kvm",
            "-cpu",
            "host",
            "-m",
            "256",
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-no-user-config",
        ]
        if isinstance(image, Path):
            args = [
                *args,
                "-kernel",
                str(image),
                "-append",
                "console=ttyS0 earlyprintk=ttyS0 panic=-1 loglevel=7",
                "-chardev",
                f"file,id=s0,path={out}",
                "-serial",
                "chardev:s0",
            ]
            want = re.compile(rb"Linux version \S+")
            what = f"the host's kernel {image.name}"
        else:
            args = [
                *args,
                "-chardev",
                f"file,id=fw,path={out}",
                "-device",
                "isa-debugcon,iobase=0x402,chardev=fw",
            ]
            want = re.compile(rb"Booting from|No bootable device")
            what = "SeaBIOS (no host kernel to probe with)"
        proc = Process(list(args), stderr_file=Path(tmp) / "stderr")
        try:
            while time.monotonic() - t0 < timeout:
                try:
                    if want.search(out.read_bytes()):
                        return answer("kvm", f"{what} ran under KVM")
                except FileNotFoundError:
                    pass
                rc = proc.poll()
                if rc is not None:
                    err = proc.stderr_text(300).splitlines()
                    return answer("tcg", f"qemu -accel kvm exited {rc}: {err[-1] if err else 'no message'}")
                time.sleep(0.1)
            return answer("tcg", f"{what} showed nothing under KVM in {timeout:.0f} s (nested KVM hanging?)")
        finally:
            proc.kill()


def choose_accel(requested: str | None, **probe_options: object) -> Probe:
    """``requested`` ("kvm"/"tcg") wins without probing; None probes."""
    if requested:
        return Probe(requested, "asked for", 0.0)
    return probe_kvm(**probe_options)  # type: ignore[arg-type]
