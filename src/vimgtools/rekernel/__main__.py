"""python -m vimgtools.rekernel: swap a guest's kernel offline, verified, all or nothing."""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING, Any

from vimgtools import _cli
from vimgtools.drill import render
from vimgtools.errors import BootCheckFailed, InvalidInput, VimgError

if TYPE_CHECKING:
    from vimgtools.rekernel import Result

log = logging.getLogger("vimgtools.rekernel")

DESCRIPTION = """\
Put the kernel from BOOTDIR into the guest on DISK and make it the default boot entry,
without booting the guest, in one libguestfs appliance launch.

BOOTDIR holds vmlinuz-VER (or vmlinuz, bzImage), modules/VER/ (or lib/modules/VER/), and
optionally config-VER, System.map-VER and an initramfs (initrd.img-VER, initramfs-VER.img,
initrd-VER). Without an initramfs the guest's own tool (update-initramfs, dracut, mkinitrd)
makes one inside the appliance; that takes minutes under TCG.

The guest's /lib/modules becomes a symlink to /boot/modules (its existing module trees move
there), so /boot carries each kernel with its modules. The version comes from the kernel image
itself. Preflight checks the architecture, room on /boot, the drivers to mount the root on the
target hypervisor (and that the initramfs carries them) and the bootloader, before anything
changes. The work happens on a temporary qcow2 overlay; only after it is verified are its
changed blocks committed into DISK (raw: through the crash-atomic journal). Any failure leaves
DISK as it was.

--target kvm (the default) also retargets a guest moved off Xen: xvd names become UUID=, the
hvc0/xvc0 console tty0 + ttyS0 in every command line, virtio drivers go into the initramfs, the
NIC keeps its name, boot code is written where pygrub needed none. Without --from the guest keeps
its own kernel. Several DISKs are one guest's disks in the order it sees them: one appliance, an
overlay each, committed all or none.

A shared system disk (DISK --guest ROOT [--guest ROOT ...]): DISK is every guest's /boot and /usr,
each ROOT a guest's own root disk (each guest sees its ROOT first, DISK second). The kernel, its
modules and one generic initramfs, carrying the disk and filesystem drivers of every guest's / and
/usr, go on DISK once: BOOTDIR's (checked on the host: not MODULES=dep, every guest's drivers, no
/dev/xvd baked in) or, when BOOTDIR has none or with --regenerate-initramfs, one generated in the
first guest's view (mkinitramfs with MODULES=list of those drivers; checked the same way after).
/usr/lib/modules on the shared /usr becomes the link to /boot/modules (a guest without usrmerge: its
own /lib/modules on its ROOT), resolved in each guest at boot (/usr mounted by the initramfs, /boot
by its fstab, vimgtools-boot-modules.service loading what udev missed before), and checked in each
guest's view. Each guest's own files (fstab, console,
NIC) change on its ROOT; the shared command line names the root by position (root=/dev/vda1). One
appliance, every disk committed all or none.
"""

EPILOG = (
    """\
examples:
  python -m vimgtools.rekernel guest.img --from /srv/kernels/6.1.0-28-cloud-amd64
  python -m vimgtools.rekernel --dry-run -v guest.img --from ./boot
  python -m vimgtools.rekernel --json guest.qcow2 --from ./boot --target xen
  python -m vimgtools.rekernel --rollback guest.img
  python -m vimgtools.rekernel --target kvm --dry-run xen-guest.img      # moved off Xen: retarget only
  python -m vimgtools.rekernel xen-root.img xen-srv.img --from ./boot    # two disks, kernel + retarget
  python -m vimgtools.rekernel -n system.img --from ./boot --guest web.img --guest db.img  # shared disk
  python -m vimgtools.rekernel --rollback system.img --guest web.img --guest db.img

"""
    + _cli.EXIT_CODES_HELP
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vimgtools.rekernel",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "disk",
        nargs="*",
        metavar="DISK",
        help="the guest's disk image; several: the guest's disks in the order it sees them (one appliance, "
        "all raw, committed all or none)",
    )
    p.add_argument("--from", dest="source", metavar="BOOTDIR", help="directory with the new kernel")
    p.add_argument(
        "--guest",
        dest="guests",
        action="append",
        default=[],
        metavar="ROOT",
        help="DISK is a shared system disk (every guest's /boot and /usr) and ROOT one guest's root disk; "
        "repeat for every guest. Needs --from (a generic initramfs there, or one is generated); all raw, "
        "committed all or none",
    )
    p.add_argument(
        "--format", dest="fmt", metavar="FMT", help="DISK's format (default: probed; raw, qcow2, ...)"
    )
    p.add_argument("--root", metavar="DEV", help="the guest root to change when DISK holds several systems")
    p.add_argument(
        "--version", dest="kversion", metavar="VER", help="the kernel to take when BOOTDIR has several"
    )
    p.add_argument(
        "--target",
        choices=("kvm", "xen"),
        default="kvm",
        help="hypervisor the guest will run on (default: kvm). kvm also retargets a guest moved off Xen "
        "(xvd names -> UUID=, hvc0/xvc0 -> tty0 + ttyS0, virtio drivers in the initramfs, the NIC's name, "
        "boot code; without --from the guest keeps its kernel). xen: refused without --from (retargeting "
        "to Xen is not supported); with --from only the kernel swap's xen-blkfront check",
    )
    p.add_argument(
        "--map",
        dest="maps",
        action="append",
        default=[],
        metavar="OLD=NEW",
        help="--target kvm: also rewrite guest device names under OLD (/dev/hda, /dev/sdb) as the disk NEW "
        "(/dev/sda = the first DISK); /dev/xvdX is always /dev/sdX. With --guest NEW is one of the two "
        "disks each guest sees: /dev/sda its own ROOT, /dev/sdb the system disk",
    )
    p.add_argument(
        "--initramfs",
        metavar="FILE",
        help="--target kvm without --from: install FILE (checked on the host) as the guest kernel's "
        "initramfs instead of regenerating one in the guest",
    )
    ini = p.add_mutually_exclusive_group()
    ini.add_argument(
        "--regenerate-initramfs",
        dest="regen",
        action="store_true",
        default=None,
        help="make the initramfs in the guest even when BOOTDIR has one (with --guest: a generic one, in "
        "the first guest's view, for every guest)",
    )
    ini.add_argument(
        "--no-regenerate-initramfs",
        dest="regen",
        action="store_false",
        help="never make one in the guest (with --guest: BOOTDIR must have one)",
    )
    p.add_argument("--force", action="store_true", help="go on despite preflight warnings (never errors)")
    p.add_argument("--workdir", metavar="DIR", help="where the temporary overlay goes (default: beside DISK)")
    p.add_argument(
        "--rollback",
        action="store_true",
        help="make the kernel booted before the last rekernel the default again (with --guest: on the "
        "shared system disk, verified in every guest's view)",
    )
    bc = p.add_argument_group("boot check")
    bc.add_argument(
        "--boot-check",
        action="store_true",
        help="before committing, boot the changed guest (python -m vimgtools.drill) and commit only "
        "when the new kernel is seen running",
    )
    bc.add_argument(
        "--boot-check-expect",
        metavar="REGEX",
        help="the boot check ends when the serial console shows REGEX (default: a login prompt)",
    )
    bc.add_argument(
        "--boot-check-timeout", type=float, metavar="S", help="give the boot check up after S seconds"
    )
    _cli.add_common_options(p)
    return p


def _run(args: argparse.Namespace) -> Result:
    from vimgtools.rekernel import rekernel, rollback

    disk = args.disk[0] if len(args.disk) == 1 else args.disk
    if args.guests:
        return _run_shared(args)
    if args.rollback:
        if len(args.disk) > 1:
            raise InvalidInput("--rollback takes one DISK")
        if args.source:
            raise InvalidInput("--rollback takes no --from")
        return rollback(disk, fmt=args.fmt, root=args.root, dry_run=args.dry_run, workdir=args.workdir)
    if not args.source:
        from vimgtools.rekernel.retargeting import retarget

        return retarget(
            disk,
            initramfs=args.initramfs,
            maps=args.maps,
            target=args.target,
            fmt=args.fmt,
            root=args.root,
            force=args.force,
            dry_run=args.dry_run,
            regenerate_initramfs=args.regen,
            workdir=args.workdir,
        )
    if args.initramfs:
        raise InvalidInput("--initramfs is for a retarget without --from (BOOTDIR holds the initramfs)")
    if not args.boot_check and (args.boot_check_expect or args.boot_check_timeout):
        raise InvalidInput("--boot-check-expect and --boot-check-timeout need --boot-check")
    check: dict[str, Any] | bool = False
    if args.boot_check:
        check = {"expect": args.boot_check_expect, "timeout": args.boot_check_timeout}
    return rekernel(
        disk,
        args.source,
        fmt=args.fmt,
        root=args.root,
        version=args.kversion,
        target=args.target,
        force=args.force,
        dry_run=args.dry_run,
        regenerate_initramfs=args.regen,
        workdir=args.workdir,
        boot_check=check,
        maps=args.maps,
    )


def _run_shared(args: argparse.Namespace) -> Result:
    from vimgtools.rekernel.shared import rekernel_shared, rollback_shared

    if len(args.disk) != 1:
        raise InvalidInput("--guest takes one DISK, the shared system disk")
    if args.rollback and args.source:
        raise InvalidInput("--rollback takes no --from")
    if not args.source and not args.rollback:
        raise InvalidInput("--guest needs --from BOOTDIR (the kernel for every guest)")
    bad = [
        opt
        for opt, given in (
            ("--boot-check", args.boot_check),
            ("--initramfs", args.initramfs),
            ("--root", args.root),
        )
        if given
    ]
    if bad:
        raise InvalidInput(f"--guest: {', '.join(bad)} not supported with a shared system disk")
    if args.fmt not in (None, "raw"):
        raise InvalidInput("--guest: the disks are committed together only when raw")
    if args.rollback:
        return rollback_shared(
            args.disk[0], args.guests, dry_run=args.dry_run, workdir=args.workdir, maps=args.maps
        )
    return rekernel_shared(
        args.disk[0],
        args.source,
        args.guests,
        version=args.kversion,
        target=args.target,
        force=args.force,
        dry_run=args.dry_run,
        regenerate_initramfs=args.regen,
        workdir=args.workdir,
        maps=args.maps,
    )


@_cli.entry("vimgtools.rekernel")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _cli.setup_logging(args.verbose, args.quiet)
    if not args.disk:
        raise InvalidInput("DISK is required")
    try:
        result = _run(args)
    except VimgError as e:
        if isinstance(e, BootCheckFailed) and e.report is not None and not args.json:
            print(render(e.report))
        if args.json:  # one object on stdout even when it failed: what was decided, and why it stopped
            obj: dict[str, Any] = e.result.to_dict() if e.result is not None else {}
            obj.update(error=str(e), exit_code=e.exit_code, committed=False)
            _cli.print_json(obj)
        raise
    if args.json:
        _cli.print_json(result.to_dict())
    elif not args.quiet:
        if result.plan is not None and args.dry_run:
            print(result.plan.describe(diffs=True))
        s = result.seconds
        what = "rehearsed (dry run, DISK unchanged)" if args.dry_run else "done"
        ver = (
            result.plan.version if result.plan else (result.verified.get("default_entry") or {}).get("kernel")
        )
        names = " ".join([*args.disk, *args.guests])
        print(
            f"{result.action} {what}: {names} now boots {ver} by default; "
            f"{result.bytes_committed} bytes committed; appliance launch {s.get('launch', 0):.1f} s, "
            f"total {s.get('total', 0):.1f} s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
