"""python -m vimgtools.sync: replicate a disk image by writing only the blocks that changed."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading

from vimgtools import _cli
from vimgtools.sync import (
    SyncOptions,
    SyncResult,
    apply_delta,
    recover,
    rollback,
    sync,
    write_delta,
    write_signature,
)
from vimgtools.sync.remote import serve
from vimgtools.sync.ssh import split_remote

log = logging.getLogger("vimgtools.sync")

DESCRIPTION = """\
Make DST a byte-identical copy of SRC, writing only the blocks that differ.

SRC and DST are images in any format QEMU reads (raw files, block devices,
qcow2 with its backing chain, vmdk, ...): what is compared and copied is what
the guest sees. A missing DST is created sparse, in the format its name says
(mail.qcow2: qcow2 with SRC's virtual and cluster size; else raw); a DST of
another virtual size is resized (shrinking needs --allow-shrink).

Formats: one given with --src-format/--dst-format is never probed. Without one,
a block device is raw, a file without another format's magic number is raw, and
any other file is probed with qemu-img info, whose non-raw answer is believed
only when the file's name says that format (mail.qcow2): a
mail.img that looks like qcow2 is refused (it may be a raw guest disk whose
guest wrote such a header, CVE-2010-3851); name its format to go on. Non-raw
images are read and written through a private NBD export (qemu-storage-daemon,
stopped when vimgtools ends); -v and --json show each SRC's backing chain.

Blocks that are all zeros in SRC become holes in a DST file (zero requests in a
qcow2); holes in both are never read.

Nothing is lost: changed blocks go to a journal (DST.vimg-journal) that is made
durable before DST is touched. If the run is killed, the next run (or --recover)
completes a committed update, or resumes an interrupted scan where it stopped;
until then DST holds its old content. With --undo FILE the old content of every
overwritten block is kept, and --rollback DST --undo FILE restores it later.

Every option works in each mode that takes it, or is refused (exit 2) naming the
option and the mode; -n/--dry-run rehearses every mode that writes (sync,
--recover, --rollback, --signature, --write-delta, --apply-delta) and writes nothing.
SRC and DST must be regular files or block devices (a FIFO, socket or character
device is refused before it is opened for reading).
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
        formatter_class=_cli.HelpFormatter,
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
    p.add_argument("--src-format", metavar="FMT", help="SRC's format (raw, qcow2, vmdk, ...): never probed")
    p.add_argument("--dst-format", metavar="FMT", help="DST's format, also of a DST to create: never probed")
    r = _cli.add_remote_options(p, "remote (SRC or DST as [USER@]HOST:PATH; see docs/remote.md)")
    r.add_argument(
        "--checksum",
        choices=("xxh128", "blake2b"),
        default="xxh128",
        help="block digest: xxh128 with a random per-run seed (default), or keyed BLAKE2b "
        "for replicas of guests whose owners are not trusted",
    )
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
    _cli.add_progress_options(p)
    _cli.add_common_options(p)
    return p


def _summary(r: SyncResult) -> str:
    h = _cli.human_bytes
    verb = "would write" if r.dry_run else "wrote"
    formats = f" ({r.src_format} -> {r.dst_format})" if (r.src_format, r.dst_format) != ("raw", "raw") else ""
    parts = [
        f"{r.src} -> {r.dst}{formats}: {h(r.size)}, {r.changed} of {r.blocks} blocks of {h(r.block_size)} "
        f"changed ({r.zero} now zero)",
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


# The options each mode takes, besides -v, -q, --json and --[no-]progress; any other one given is refused.
MODE_OPTIONS = {
    "SRC DST": {
        "block_size", "verify", "undo", "allow_shrink", "force", "journal", "state", "keep_cache",
        "rsh", "remote_python", "checksum", "timeout", "progress", "dry_run", "src_format", "dst_format",
    },
    "--recover": {"journal", "dry_run", "dst_format"},
    "--rollback": {"undo", "dry_run", "dst_format"},
    "--signature": {"output", "block_size", "checksum", "keep_cache", "progress", "dry_run", "src_format"},
    "--write-delta": {"against", "block_size", "keep_cache", "progress", "dry_run", "src_format"},
    "--apply-delta": {"force", "journal", "allow_shrink", "progress", "dry_run", "dst_format"},
}  # fmt: skip
REMOTE_ONLY = ("rsh", "remote_python", "timeout")


def _mode(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The one mode asked for; any option given that it does not take is a usage error (exit 2)."""
    modes = [m for m in MODE_OPTIONS if m.startswith("--") and getattr(args, m[2:].replace("-", "_"))]
    if len(modes) > 1:
        parser.error(f"{modes[0]} and {modes[1]} are two modes: give one")
    mode = modes[0] if modes else "SRC DST"
    flags = {a.dest: a.option_strings[-1] for a in parser._actions if a.option_strings}
    always = {
        "help",
        "verbose",
        "quiet",
        "json",
        "progress",
        "server",
        *(m[2:].replace("-", "_") for m in modes),
    }
    given = [d for d in flags if d not in always and getattr(args, d) != parser.get_default(d)]
    for dest in given:
        if dest not in MODE_OPTIONS[mode]:
            parser.error(f"{flags[dest]} does not apply to {mode}")
    if mode == "SRC DST" and len(args.images) == 2:
        remote = any(split_remote(p)[0] for p in args.images)
        for dest in given:
            if dest in REMOTE_ONLY and not remote:
                parser.error(f"{flags[dest]} applies only when SRC or DST is [USER@]HOST:PATH")
            if dest == "checksum" and not (remote or args.state):
                parser.error(
                    "--checksum applies only to a remote sync or --state (a local sync compares bytes)"
                )
    return mode


def _files_mode(parser: argparse.ArgumentParser, args: argparse.Namespace, mode: str) -> int:
    """--signature, --write-delta, --apply-delta."""
    bar = _cli.progress_bar(args, "read")
    h = _cli.human_bytes
    would = "would write" if args.dry_run else "wrote"
    try:
        if mode == "--signature":
            if not args.output or args.images:
                parser.error("--signature IMAGE needs -o SIGFILE and no other images")
            info = write_signature(
                args.signature,
                args.output,
                block_size=4096 if args.block_size is None else args.block_size,
                checksum=args.checksum,
                progress=bar,
                keep_cache=args.keep_cache,
                dry_run=args.dry_run,
                fmt=args.src_format,
            )
            log.info(
                "%s: %s the signature of %s, %d blocks of %s",
                info.path, would, h(info.size), info.count, h(info.block_size),
            )  # fmt: skip
            summary: dict[str, object] = {
                "signature": str(info.path),
                "size": info.size,
                "blocks": info.count,
                "block_size": info.block_size,
                "checksum": info.checksum,
                "dry_run": args.dry_run,
            }
        elif mode == "--write-delta":
            if not args.against or len(args.images) != 1:
                parser.error("--write-delta DELTA needs SRC and --against SIGFILE")
            r = write_delta(
                args.images[0], args.write_delta, args.against, block_size=args.block_size, progress=bar,
                keep_cache=args.keep_cache, dry_run=args.dry_run, fmt=args.src_format,
            )  # fmt: skip
            log.info(
                "%s: %d of %d blocks changed, %s %s of data",
                args.write_delta, r.changed, r.blocks, would, h(r.delta_bytes),
            )  # fmt: skip
            summary = {"delta": args.write_delta, "dry_run": args.dry_run, **vars(r)}
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
                fmt=args.dst_format,
            )
            if args.dry_run:
                log.info("%s: checked; would apply %d changed blocks", args.images[0], r.changed)
            else:
                log.info(
                    "%s: applied %d changed blocks, %s written", args.images[0], r.changed, h(r.bytes_written)
                )
            summary = {"dst": args.images[0], "dry_run": args.dry_run, **vars(r)}
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
    mode = _mode(parser, args)
    if mode == "--recover":
        if args.images:
            parser.error("--recover takes only DST")
        written = recover(args.recover, journal=args.journal, dry_run=args.dry_run, fmt=args.dst_format)
        if written is None:
            log.info("%s: no committed update to complete", args.recover)
        elif args.dry_run:
            log.info("%s: would complete the interrupted update (%s of data)", args.recover, written)
        else:
            log.info("%s: completed the interrupted update (%s written)", args.recover, written)
        if args.json:
            _cli.print_json(
                {"recovered": written is not None and not args.dry_run, "bytes_written": 0 if args.dry_run else written or 0,
                 "dry_run": args.dry_run, "would_write": written or 0 if args.dry_run else None}
            )  # fmt: skip
        return 0
    if mode == "--rollback":
        if not args.undo or args.images:
            parser.error("--rollback DST needs --undo FILE and no other images")
        written = rollback(args.rollback, args.undo, dry_run=args.dry_run, fmt=args.dst_format)
        if args.dry_run:
            log.info(
                "%s: checked against %s; a rollback would write %d bytes", args.rollback, args.undo, written
            )
        else:
            log.info("%s: rolled back with %s (%d bytes written)", args.rollback, args.undo, written)
        if args.json:
            _cli.print_json(
                {"rolled_back": not args.dry_run, "bytes_written": 0 if args.dry_run else written,
                 "dry_run": args.dry_run, "would_write": written if args.dry_run else None}
            )  # fmt: skip
        return 0
    if mode != "SRC DST":
        return _files_mode(parser, args, mode)
    if len(args.images) != 2:
        parser.error("give SRC and DST (or --recover DST, or --rollback DST --undo FILE)")
    src, dst = args.images
    options = SyncOptions(
        block_size=4096 if args.block_size is None else args.block_size,
        dry_run=args.dry_run,
        verify=args.verify,
        undo=args.undo,
        allow_shrink=args.allow_shrink,
        force=args.force,
        journal=args.journal,
        keep_cache=args.keep_cache,
        state=args.state,
        checksum=args.checksum,
        rsh=args.rsh,
        remote_python=args.remote_python,
        timeout=args.timeout,
        src_format=args.src_format,
        dst_format=args.dst_format,
    )
    bar = _cli.progress_bar(args, "sync")
    stop = threading.Event()
    _cli.install_stop_handlers(stop)
    try:
        result = sync(src, dst, options, progress=bar, stop=stop)
    finally:
        if bar:
            bar.close()
    log.info("%s", _summary(result))
    if args.json:
        _cli.print_json(result.to_dict())
    return 0


def _exit_now(code: int) -> None:
    """Exit without the interpreter's teardown (0.03-0.06 s a run: numpy's and every module's
    finalisation, the thread pools' atexit joins). Everything the run wrote is closed by now
    (and fsynced where that matters); only our own stdio buffers are left to flush."""
    logging.shutdown()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:  # the reader went away (`| head`): as _cli.entry does
        code = code or 1
    os._exit(code)


if __name__ == "__main__":
    _exit_now(main())
