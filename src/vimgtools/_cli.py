"""Shared parts of the command-line tools: common options, logging, errors to exit codes."""

from __future__ import annotations

import argparse
import errno
import functools
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any, TypeVar, cast

from vimgtools.errors import InvalidInput, VimgError

log = logging.getLogger("vimgtools")

EXIT_CODES_HELP = """\
exit codes:
  0    done
  1    failed; the target is as it was, or recoverable as documented
  2    bad usage, or input refused before anything was changed
  130  interrupted (SIGINT/SIGTERM) at a consistent point; run again to resume
"""

_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's raw-description formatter, told the terminal's width without ``shutil``.

    argparse makes a formatter for every ``add_argument`` (to check it), and the base class
    imports shutil for the width: shutil loads zlib, bz2 and lzma, five files read from the
    disk on every start of a command whose page cache was dropped. Same width rule as
    ``shutil.get_terminal_size``: $COLUMNS, else stdout's terminal, else 80; minus 2.
    """

    def __init__(
        self, prog: str, indent_increment: int = 2, max_help_position: int = 24, width: int | None = None
    ):
        if width is None:
            try:
                columns = int(os.environ.get("COLUMNS", "0"))
            except ValueError:
                columns = 0
            if columns <= 0:
                try:
                    columns = os.get_terminal_size(sys.__stdout__.fileno()).columns if sys.__stdout__ else 0
                except (OSError, ValueError):
                    columns = 0
            width = (columns or 80) - 2
        super().__init__(prog, indent_increment, max_help_position, width)


def parse_size(text: str) -> int:
    """``"64K"`` -> 65536. Accepts K, M, G, T (powers of 1024), optionally with ``iB``/``B``."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in _SUFFIXES else ""
    number = t[: len(t) - len(unit)]
    if not number.isdigit():
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 4096, 64K, 1M)")
    return int(number) * _SUFFIXES[unit]


def add_common_options(parser: argparse.ArgumentParser, *, dry_run: bool = True) -> None:
    """-v/-q/--json (and -n/--dry-run where something is written)."""
    g = parser.add_argument_group("output")
    g.add_argument("-v", "--verbose", action="count", default=0, help="more detail; tracebacks on errors")
    g.add_argument("-q", "--quiet", action="store_true", help="only errors on stderr")
    g.add_argument("--json", action="store_true", help="print one JSON object with the summary on stdout")
    if dry_run:
        parser.add_argument(
            "-n", "--dry-run", action="store_true", help="read, decide and report; write nothing"
        )


def add_remote_options(parser: argparse.ArgumentParser, title: str) -> argparse._ArgumentGroup:
    """-e/--rsh, --remote-python, --timeout (and the hidden --server of the far end); returns the group."""
    r = parser.add_argument_group(title)
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
        "--timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="give up when the far side is silent this long (default: 300)",
    )
    r.add_argument("--server", action="store_true", help=argparse.SUPPRESS)
    return r


def add_progress_options(parser: argparse.ArgumentParser) -> None:
    """--progress / --no-progress: a bar on stderr; by default only when stderr is a terminal."""
    bar = parser.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None, help="progress bar")
    bar.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def progress_bar(args: argparse.Namespace, label: str) -> ProgressBar | None:
    """A bar on a TTY, or when --progress asks for one; never with -q or --no-progress."""
    show = sys.stderr.isatty() if args.progress is None else args.progress
    return ProgressBar(label) if show and not args.quiet else None


def install_stop_handlers(stop: threading.Event) -> None:
    """SIGINT/SIGTERM set ``stop`` (the library stops at its next consistent point); a second one aborts."""

    def handler(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():  # a second signal: give up at once
            signal.signal(signum, signal.SIG_DFL)
            raise KeyboardInterrupt
        log.warning("stopping at the next consistent point (again to abort)")
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def setup_logging(verbose: int = 0, quiet: bool = False, prog: str | None = None) -> None:
    """Logs go to stderr as ``prog: message``; stdout is for results (--json)."""
    global _PROG
    _PROG = prog or _PROG
    level = logging.ERROR if quiet else logging.DEBUG if verbose else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{_PROG}: %(message)s"))
    root = logging.getLogger("vimgtools")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


_PROG = "vimgtools"


def print_json(obj: Any) -> None:
    import json  # here: a run without --json never loads it (~5 ms of start-up)

    json.dump(obj, sys.stdout, indent=None, sort_keys=True, default=str)
    sys.stdout.write("\n")
    sys.stdout.flush()


MainFn = TypeVar("MainFn", bound=Callable[..., int])


def entry(prog: str) -> Callable[[MainFn], MainFn]:
    """Wrap a CLI ``main``: VimgError -> one line and its exit code; Ctrl-C -> 130; EPIPE -> quiet.

    The traceback is shown only with ``-v`` (anything not a VimgError is a bug and shows it always).
    """

    def wrap(main: MainFn) -> MainFn:
        @functools.wraps(main)
        def run(argv: list[str] | None = None) -> int:
            args = sys.argv[1:] if argv is None else argv
            verbose = any(a == "--verbose" or (a[:2] == "-v" and set(a[1:]) == {"v"}) for a in args)
            setup_logging(int(verbose), prog=prog)
            try:
                return main(argv)
            except VimgError as e:
                if verbose:
                    log.exception("error: %s", describe_error(e))
                else:
                    log.error("error: %s", describe_error(e))
                return e.exit_code
            except KeyboardInterrupt:
                log.error("interrupted")
                return 130
            except BrokenPipeError:
                # The reader went away (`| head`): exit quietly, as cat does.
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                return 1
            except OSError as e:
                if e.errno == errno.EPIPE:
                    return 1
                raise

        return cast(MainFn, run)

    return wrap


def describe_error(e: VimgError) -> str:
    """The error as a CLI user reads it: a library option at fault is named by its flag."""
    if isinstance(e, InvalidInput) and e.option:
        return f"--{e.option.replace('_', '-')}: {e.reason}"
    return str(e)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class ProgressBar:
    """A progress bar on stderr (tqdm's), called with (bytes done, bytes total): a library progress callback.

    The CLIs make one when stderr is a TTY or ``--progress`` asks for it; ``close()`` ends its line.
    """

    def __init__(self, label: str) -> None:
        from tqdm import tqdm  # only a CLI with a bar pays for the import

        self._bar = tqdm(
            desc=label, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
            mininterval=0.1, dynamic_ncols=True, leave=True,
        )  # fmt: skip

    def __call__(self, done: int, total: int) -> None:
        if self._bar.total != total:
            self._bar.total = total
        self._bar.update(done - self._bar.n)  # tqdm redraws at most every mininterval

    def close(self) -> None:
        self._bar.close()
