"""python -m vimgtools.replicate: copy a guest's disks into a replica directory, one whole generation a run."""

from __future__ import annotations

import argparse
import logging
import sys
import threading

from vimgtools import _cli
from vimgtools.replicate import DEFAULT_URI, ReplicateResult, recover, replicate
from vimgtools.replicate.dest import serve

log = logging.getLogger("vimgtools.replicate")

DESCRIPTION = """\
Replicate a guest into DEST, a directory that always holds one whole generation
(here, or [USER@]HOST:DIR on the DR host over ssh, as sync's remote: vimgtools
installed there, nothing held open between disks):
one replica per disk (vda.img, vdb.img, ... or .qcow2 with --format qcow2) and
manifest.json (guest, generation, time, consistency, and each disk's target, file,
source, format, virtual size and dirty bitmap).

GUEST is one of:
  NAME            a libvirt domain (--connect URI): running, through libvirt's
                  checkpoints and pull-mode backup, frozen through its guest
                  agent when it has one; shut off, read as its images
  qmp:PATH        a running QEMU started without libvirt, through its QMP socket
                  (-qmp unix:PATH,server=on,wait=off); --agent SOCKET is the host
                  side of its guest agent's port, for a frozen (application-
                  consistent) moment
  IMAGE ...       a shut-off guest, as its disk images in the order it sees them

A running guest is read at one moment for all its disks (one QMP transaction,
the filesystems frozen through the guest agent when there is one, else crash-
consistent with a warning) while it goes on running. The first run copies what
is allocated; for every qcow2 disk a persistent dirty bitmap (vimgtools.gen-N)
starts no later than that moment, so the next run reads only the extents written
since. When that tracking is lost (bitmap missing or inconsistent after QEMU was
killed, disk resized, replica changed since), that disk is compared in full and
the run says why. The manifest of a generation is written only after all its
disks are durable; older bitmaps of vimgtools are removed only then.
"""

EPILOG = (
    """\
examples:
  python -m vimgtools.replicate --agent /run/qemu/mail.qga qmp:/run/qemu/mail.qmp /srv/dr/mail
  python -m vimgtools.replicate /var/lib/libvirt/images/mail.qcow2 /srv/dr/mail
  python -m vimgtools.replicate --json sys.qcow2 data.qcow2 /srv/dr/files
  python -m vimgtools.replicate -c qemu:///system mail dr-host:/srv/dr/mail

"""
    + _cli.EXIT_CODES_HELP
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vimgtools.replicate",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "guest",
        nargs="*",
        metavar="GUEST",
        help="a libvirt domain, qmp:PATH, or a shut-off guest's images in its order",
    )
    p.add_argument(
        "dest", metavar="DEST", help="the replica directory, or [USER@]HOST:DIR over ssh (created if missing)"
    )
    p.add_argument(
        "--recover",
        action="store_true",
        help="only put DEST back to the generation its manifest says, after a run that died while "
        "writing it (every run does this first); no GUEST",
    )
    p.add_argument(
        "--name", help="the guest's name in the manifest (default: QEMU's -name, or the first image's)"
    )
    p.add_argument(
        "-c",
        "--connect",
        metavar="URI",
        default=DEFAULT_URI,
        help=f"libvirt's URI (default {DEFAULT_URI})",
    )
    p.add_argument(
        "--agent", metavar="SOCKET", help="with qmp:PATH: the guest agent's socket, to freeze the guest"
    )
    p.add_argument(
        "--format", choices=("raw", "qcow2"), default="raw", help="the replicas' format (default raw)"
    )
    p.add_argument(
        "-b", "--block-size", type=_cli.parse_size, default=4096, metavar="SIZE", help="compare unit"
    )
    p.add_argument(
        "--define",
        metavar="URI",
        help="then define the clone there (e.g. qemu:///system on the DR host) as an inactive libvirt "
        "domain from DEST/domain.xml: disks at the replicas, never started; a domain of that name that "
        "is not a clone of ours is never touched",
    )
    p.add_argument(
        "--as", dest="as_name", metavar="NAME", help="with --define: the clone's name (default the guest's)"
    )
    p.add_argument(
        "--full",
        action="store_true",
        help="compare every disk in full this run, whatever the bitmaps say (a scrub); tracking goes on",
    )
    _cli.add_remote_options(p, "remote (DEST as [USER@]HOST:DIR; see docs/replicate.md)")
    _cli.add_progress_options(p)
    _cli.add_common_options(p)
    return p


def _server(argv: list[str]) -> int:
    """The DR host's end of an ssh DEST: one directory operation on stdin/stdout."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--server", action="store_true")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("-v", "--verbose", action="count", default=0)
    args, _ = p.parse_known_args(argv)
    _cli.setup_logging(args.verbose, quiet=True)
    return serve(timeout=args.timeout)


def _summary(r: ReplicateResult) -> str:
    h = _cli.human_bytes
    verb = "would be" if r.dry_run else "is"
    parts = [f"{d.target} {d.mode} (read {h(d.bytes_read)}, wrote {h(d.bytes_written)})" for d in r.disks]
    return f"{r.dest}: generation {r.generation} of {r.guest} {verb} complete: " + "; ".join(parts)


@_cli.entry("vimgtools.replicate")
def main(argv: list[str] | None = None) -> int:
    if "--server" in (sys.argv[1:] if argv is None else argv):  # no GUEST nor DEST there
        return _server(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)  # options anywhere: GUEST --full DEST too
    remote = dict(rsh=args.rsh, remote_python=args.remote_python, timeout=args.timeout)
    if args.recover:
        if args.guest:
            parser.error("--recover takes only DEST")
        _cli.setup_logging(args.verbose, args.quiet)
        restored = recover(args.dest, dry_run=args.dry_run, **remote)
        log.info(
            "%s: %s", args.dest, f"put back: {', '.join(restored)}" if restored else "nothing to put back"
        )
        if args.json:
            _cli.print_json({"dest": args.dest, "restored": restored, "dry_run": args.dry_run})
        return 0
    if not args.guest:
        parser.error("GUEST is missing")
    guest = args.guest if len(args.guest) > 1 else args.guest[0]
    if args.agent and not (isinstance(guest, str) and guest.startswith("qmp:")):
        parser.error("--agent applies only to GUEST qmp:PATH")
    if args.as_name and not args.define:
        parser.error("--as applies only with --define")
    _cli.setup_logging(args.verbose, args.quiet)
    stop = threading.Event()
    _cli.install_stop_handlers(stop)
    bar = _cli.progress_bar(args, "replicate")
    try:
        result = replicate(
            guest, args.dest, name=args.name, agent=args.agent, uri=args.connect, fmt=args.format, dry_run=args.dry_run,
            block_size=args.block_size, full=args.full, define=args.define, as_name=args.as_name, progress=(lambda t, done, total: bar(done, total)) if bar else None,
            stop=stop, **remote,
        )  # fmt: skip
    finally:
        if bar:
            bar.close()
    log.info("%s", _summary(result))
    if args.json:
        _cli.print_json(result.to_dict())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
