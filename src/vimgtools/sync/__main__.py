"""python -m vimgtools.sync: replicate a disk image by writing only the blocks that changed."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from types import FrameType

from vimgtools import _cli
from vimgtools.errors import InvalidInput
from vimgtools.sync import SyncResult, recover, rollback, sync
from vimgtools.sync.remote import serve

log = logging.getLogger("vimgtools.sync")

DESCRIPTION = """\
Make DST a byte-identical copy of SRC, writing only the blocks that differ.

SRC and DST are raw images (files) or block devices. A missing DST is created
sparse; a DST file of another size is resized (shrinking needs --allow-shrink).
Blocks that are all zeros in SRC become holes in a DST file; holes in both are
never read.

Nothing is lost: changed blocks go to a journal (DST.vimg-journal) that is made
durable before DST is touched. If the run is killed, the next run (or --recover)
completes a committed update, or resumes an interrupted scan where it stopped;
until then DST holds its old content. With --undo FILE the old content of every
overwritten block is kept, and --rollback DST --undo FILE restores it later.
"""

EPILOG = (
    """\
examples:
  python -m vimgtools.sync /var/lib/libvirt/images/mail.img /backup/mail.img
  python -m vimgtools.sync --json --undo /backup/mail.undo /dev/vg0/mail /dev/vg1/mail
  python -m vimgtools.sync --recover /backup/mail.img
  python -m vimgtools.sync --rollback /backup/mail.img --undo /backup/mail.undo
  python -m vimgtools.sync /dev/vg0/mail backup@dr-host:/dev/vg1/mail         (push over ssh)
  python -m vimgtools.sync -e "ssh -p 2222" dr-host:/srv/mail.img /srv/mail.img (pull)
  python -m vimgtools.sync --signature /dr/mail.img -o mail.sig          (on the replica's host)
  python -m vimgtools.sync /srv/mail.img --write-delta mail.delta --against mail.sig
  python -m vimgtools.sync --apply-delta mail.delta /dr/mail.img          (back on the replica's host)

"""
    + _cli.EXIT_CODES_HELP
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vimgtools.sync",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("images", nargs="*", metavar="SRC DST", help="source and replica (file or block device)")
    p.add_argument(
        "-b",
        "--block-size",
        type=_cli.parse_size,
        default=None,
        metavar="SIZE",
        help="comparison unit, a power of two from 4K to 8M (default: 4K; a delta uses its signature's)",
    )
    p.add_argument("--verify", action="store_true", help="re-read DST afterwards and compare with SRC")
    p.add_argument("--undo", metavar="FILE", help="keep the old content of overwritten blocks in FILE")
    p.add_argument("--allow-shrink", action="store_true", help="cut a larger DST file to SRC's size")
    p.add_argument("--force", action="store_true", help="write DST even when a running VM holds it open")
    p.add_argument("--journal", metavar="FILE", help="journal path (default: DST.vimg-journal)")
    p.add_argument(
        "--state",
        metavar="FILE",
        help="keep SRC's block digests in FILE; the next run reads SRC alone if DST was not touched "
        "in between (see docs/remote.md)",
    )
    p.add_argument(
        "--keep-cache",
        action="store_true",
        help="keep what this run reads in the page cache (default: evict what it brought in)",
    )
    r = p.add_argument_group("remote (SRC or DST as [USER@]HOST:PATH; see docs/remote.md)")
    r.add_argument(
        "-e",
        "--rsh",
        default="ssh",
        metavar="CMD",
        help='command that reaches HOST, as in rsync (default: ssh), e.g. "ssh -p 2222 -i key"',
    )
    r.add_argument(
        "--remote-python",
        default="python3",
        metavar="PY",
        help="the Python on HOST that has vimgtools (default: python3)",
    )
    r.add_argument(
        "--checksum",
        choices=("xxh128", "blake2b"),
        default="xxh128",
        help="block digest: xxh128 with a random per-run seed (default), or keyed BLAKE2b "
        "for replicas of guests whose owners are not trusted",
    )
    r.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="give up when the far side is silent this long (default: 300)",
    )
    r.add_argument("--server", action="store_true", help=argparse.SUPPRESS)
    f = p.add_argument_group(
        "signatures and deltas (for another channel: a disk in the post, a one-way link)"
    )
    f.add_argument("--signature", metavar="IMAGE", help="write the block digests of IMAGE to -o FILE")
    f.add_argument("-o", "--output", metavar="FILE", help="where --signature writes")
    f.add_argument(
        "--write-delta", metavar="DELTA", help="with SRC and --against SIGFILE: write SRC's changed blocks"
    )
    f.add_argument("--against", metavar="SIGFILE", help="the signature --write-delta compares with")
    f.add_argument(
        "--apply-delta",
        metavar="DELTA",
        help="with DST: apply DELTA, after checking DST is the image its signature was made of",
    )
    p.add_argument("--recover", metavar="DST", help="complete an update an interrupted run committed")
    p.add_argument("--rollback", metavar="DST", help="restore DST from the --undo FILE of a previous sync")
    bar = p.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None, help="progress bar")
    bar.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    _cli.add_common_options(p)
    return p


def _install_stop_handlers(stop: threading.Event) -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():  # a second signal: give up at once
            signal.signal(signum, signal.SIG_DFL)
            raise KeyboardInterrupt
        log.warning("stopping at the next consistent point (again to abort)")
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def _summary(r: SyncResult) -> str:
    h = _cli.human_bytes
    verb = "would write" if r.dry_run else "wrote"
    parts = [
        f"{r.src} -> {r.dst}: {h(r.size)}, {r.changed} of {r.blocks} blocks of {h(r.block_size)} changed "
        f"({r.zero} now zero)",
        f"{verb} {h(r.changed * r.block_size if r.dry_run else r.bytes_written)}",
        f"read {h(r.bytes_read)}",
    ]
    if r.journal_bytes:
        parts.append(f"journal {h(r.journal_bytes)}")
    if r.bytes_sent is not None:
        parts.append(f"sent {h(r.bytes_sent)}, received {h(r.bytes_received or 0)}")
    if r.created:
        parts.append("created")
    if r.resized_from is not None:
        parts.append(f"resized from {h(r.resized_from)}")
    if r.dst_extra_bytes:
        parts.append(f"the device's last {h(r.dst_extra_bytes)} left as they were")
    if r.verified:
        parts.append("verified")
    return ", ".join(parts) + f" in {r.seconds:.2f} s"


def _files_mode(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """--signature, --write-delta, --apply-delta."""
    from vimgtools.sync.signature import apply_delta, write_delta, write_signature

    show_bar = sys.stderr.isatty() if args.progress is None else args.progress
    bar = _cli.ProgressBar("read") if show_bar and not args.quiet else None
    h = _cli.human_bytes
    try:
        if args.signature:
            if not args.output or args.images:
                parser.error("--signature IMAGE needs -o SIGFILE and no other images")
            info = write_signature(
                args.signature,
                args.output,
                block_size=4096 if args.block_size is None else args.block_size,
                checksum=args.checksum,
                progress=bar,
            )
            log.info(
                "%s: signature of %s, %d blocks of %s",
                info.path,
                h(info.size),
                info.count,
                h(info.block_size),
            )
            summary: dict[str, object] = {
                "signature": str(info.path),
                "size": info.size,
                "blocks": info.count,
                "block_size": info.block_size,
                "checksum": info.checksum,
            }
        elif args.write_delta:
            if not args.against or len(args.images) != 1:
                parser.error("--write-delta DELTA needs SRC and --against SIGFILE")
            r = write_delta(
                args.images[0], args.write_delta, args.against, block_size=args.block_size, progress=bar
            )
            log.info(
                "%s: %d of %d blocks changed, %s of data",
                args.write_delta,
                r.changed,
                r.blocks,
                h(r.delta_bytes),
            )
            summary = {"delta": args.write_delta, **vars(r)}
        else:
            if len(args.images) != 1:
                parser.error("--apply-delta DELTA needs DST")
            r = apply_delta(
                args.apply_delta,
                args.images[0],
                allow_shrink=True,
                force=args.force,
                dry_run=args.dry_run,
                journal=args.journal,
                progress=bar,
            )
            log.info(
                "%s: applied %d changed blocks, %s written", args.images[0], r.changed, h(r.bytes_written)
            )
            summary = {"dst": args.images[0], **vars(r)}
    finally:
        if bar:
            bar.close()
    if args.json:
        _cli.print_json(summary)
    return 0


@_cli.entry("vimgtools.sync")
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.server:  # the far end of a remote sync: the protocol on stdin/stdout, logs on stderr
        _cli.setup_logging(args.verbose, quiet=True)
        return serve(timeout=args.timeout)
    _cli.setup_logging(args.verbose, args.quiet)
    if args.recover:
        if args.images:
            parser.error("--recover takes only DST")
        written = recover(args.recover, journal=args.journal)
        if written is None:
            log.info("%s: no committed update to complete", args.recover)
        else:
            log.info("%s: completed the interrupted update (%s written)", args.recover, written)
        if args.json:
            _cli.print_json({"recovered": written is not None, "bytes_written": written or 0})
        return 0
    if args.rollback:
        if not args.undo or args.images:
            parser.error("--rollback DST needs --undo FILE and no other images")
        written = rollback(args.rollback, args.undo)
        log.info("%s: rolled back with %s (%d bytes written)", args.rollback, args.undo, written)
        if args.json:
            _cli.print_json({"rolled_back": True, "bytes_written": written})
        return 0
    if args.signature or args.write_delta or args.apply_delta:
        return _files_mode(parser, args)
    if args.block_size is None:
        args.block_size = 4096
    if len(args.images) != 2:
        parser.error("give SRC and DST (or --recover DST, or --rollback DST --undo FILE)")
    src, dst = args.images
    show_bar = sys.stderr.isatty() if args.progress is None else args.progress
    bar = _cli.ProgressBar("sync") if show_bar and not args.quiet else None
    stop = threading.Event()
    _install_stop_handlers(stop)
    try:
        result = sync(
            src,
            dst,
            block_size=args.block_size,
            dry_run=args.dry_run,
            verify=args.verify,
            undo=args.undo,
            allow_shrink=args.allow_shrink,
            force=args.force,
            journal=args.journal,
            keep_cache=args.keep_cache,
            progress=bar,
            stop=stop,
            checksum=args.checksum,
            rsh=args.rsh,
            remote_python=args.remote_python,
            timeout=args.timeout,
            state=args.state,
        )
    except InvalidInput:
        raise
    finally:
        if bar:
            bar.close()
    log.info("%s", _summary(result))
    if args.json:
        _cli.print_json(result.to_dict())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
