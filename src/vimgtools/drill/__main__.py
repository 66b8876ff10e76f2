"""python -m vimgtools.drill: boot a replica on throw-away overlays and say whether it comes up."""

from __future__ import annotations

import argparse
import logging
import signal
from pathlib import Path
from types import FrameType

from vimgtools import _cli
from vimgtools.drill.qemu import ACCELS, BUSES, NETS
from vimgtools.drill.stages import Stage

log = logging.getLogger("vimgtools.drill")

DESCRIPTION = """\
Boot the replica's DISKs (in the order the guest sees them) in qemu on throw-away qcow2 overlays
in a private temporary directory, watch the boot on the serial console, power the guest off and
delete the overlays. The DISKs are opened read-only and never written.

Stages, each with its time since the guest started: firmware (handed over to a boot loader),
bootloader (its output on the serial console), kernel (its "Linux version" line; for a quiet
console the version is read from guest memory), userspace (the first line that is not the
kernel's), and the end: a login prompt on the serial console (default), --expect REGEX on it, or
with --agent the guest agent answering guest-ping and guest-get-osinfo.

KVM is used when /dev/kvm really runs a kernel (probed for a few seconds: nested KVM can hang),
else TCG; --accel decides instead. No network unless --net user (an isolated user-mode NIC).
"""

EPILOG = """\
examples:
  python -m vimgtools.drill /srv/replicas/web1/disk0.img
  python -m vimgtools.drill /srv/dr/mail                   (a replica directory of vimgtools.replicate)
  python -m vimgtools.drill --json --timeout 300 disk0.qcow2 disk1.qcow2
  python -m vimgtools.drill --expect 'Reached target.*Multi-User' --screenshot web1.png disk0.img
  python -m vimgtools.drill --agent --uefi --memory 2G --cpus 2 disk0.img

exit codes:
  0    the guest booted (the end condition was met)
  1    it did not boot (the report says which stage was last reached), or qemu failed
  2    bad usage, or a disk that is missing, unreadable or not an image
  130  interrupted (the guest is stopped and the overlays removed all the same)
"""


def _memory(text: str) -> int:
    """``1024`` (MiB), ``2G``, ``512M`` -> MiB."""
    if text.strip().isdigit():
        return int(text)
    return _cli.parse_size(text) >> 20


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vimgtools.drill",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "disks",
        nargs="+",
        metavar="DISK",
        help="the replica's disk images, the boot disk first; or one replica directory (its manifest.json "
        "names the disks, their order and formats)",
    )
    p.add_argument(
        "--format",
        dest="formats",
        action="append",
        metavar="FMT",
        help="a DISK's format, once per DISK in order (default: probed)",
    )
    p.add_argument("--accel", choices=ACCELS, help="kvm or tcg (default: probe KVM, else TCG)")
    p.add_argument(
        "--memory", type=_memory, default=1024, metavar="SIZE", help="guest memory, MiB or 2G (default 1024)"
    )
    p.add_argument("--cpus", type=int, default=1, metavar="N", help="virtual CPUs (default 1)")
    p.add_argument("--uefi", action="store_true", help="boot with UEFI (Debian's OVMF) instead of BIOS")
    p.add_argument("--net", choices=NETS, default="none", help="none (default) or user: an isolated NIC")
    p.add_argument(
        "--bus", choices=BUSES, default="virtio", help="how the disks are attached (default virtio)"
    )
    end = p.add_mutually_exclusive_group()
    end.add_argument(
        "--agent", action="store_true", help="end when qemu-guest-agent answers (instead of a login prompt)"
    )
    end.add_argument("--expect", metavar="REGEX", help="end when the serial console shows REGEX")
    p.add_argument(
        "--timeout",
        type=float,
        metavar="S",
        help="give up after S seconds (default 600 under TCG, 180 with KVM)",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=60.0,
        metavar="S",
        help="seconds to wait for the ACPI poweroff before killing qemu (default 60)",
    )
    p.add_argument("--screenshot", type=Path, metavar="FILE", help="save the VGA screen as PNG at the end")
    p.add_argument(
        "--log",
        type=Path,
        metavar="FILE",
        help="write the serial log here (default: in the drill's directory)",
    )
    p.add_argument(
        "--workdir", type=Path, metavar="DIR", help="parent of the private directory (default $TMPDIR)"
    )
    _cli.add_common_options(p, dry_run=False)
    return p


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # the drill stops its qemu and removes the overlays on the way out


@_cli.entry("vimgtools.drill")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _cli.setup_logging(args.verbose, args.quiet)
    signal.signal(signal.SIGTERM, _terminate)
    from vimgtools.drill import boot, render

    def progress(stage: Stage) -> None:
        when = "   ?  " if stage.seconds is None else f"{stage.seconds:5.1f}s"
        log.info("%s %-10s %s", when, stage.name, stage.detail)

    report = boot(
        args.disks,
        progress=None if args.quiet else progress,
        accel=args.accel,
        memory_mb=args.memory,
        cpus=args.cpus,
        uefi=args.uefi,
        net=args.net,
        bus=args.bus,
        timeout=args.timeout,
        grace=args.grace,
        agent=args.agent,
        expect=args.expect,
        screenshot=args.screenshot,
        log=args.log,
        formats=tuple(args.formats or ()),
        workdir=args.workdir,
    )
    if args.json:
        _cli.print_json(report.to_dict())
    elif not args.quiet or not report.booted:
        print(render(report))
    return 0 if report.booted else 1


if __name__ == "__main__":
    raise SystemExit(main())
