"""Shared parts of the command-line tools: common options, logging, errors to exit codes."""

from __future__ import annotations

import argparse
import errno
import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from vimgtools.errors import VimgError

log = logging.getLogger("vimgtools")

EXIT_CODES_HELP = """\
exit codes:
  0    done
  1    failed; the target is as it was, or recoverable as documented
  2    bad usage, or input refused before anything was changed
  130  interrupted (SIGINT/SIGTERM) at a consistent point; run again to resume
"""

_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


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
    json.dump(obj, sys.stdout, indent=None, sort_keys=True, default=str)
    sys.stdout.write("\n")
    sys.stdout.flush()


def entry(prog: str) -> Callable[[Callable[[list[str] | None], int]], Callable[[list[str] | None], int]]:
    """Wrap a CLI ``main``: VimgError -> one line and its exit code; Ctrl-C -> 130; EPIPE -> quiet.

    The traceback is shown only with ``-v`` (anything not a VimgError is a bug and shows it always).
    """

    def wrap(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
        @functools.wraps(main)
        def run(argv: list[str] | None = None) -> int:
            args = sys.argv[1:] if argv is None else argv
            verbose = any(a == "--verbose" or (a[:2] == "-v" and set(a[1:]) == {"v"}) for a in args)
            setup_logging(int(verbose), prog=prog)
            try:
                return main(argv)
            except VimgError as e:
                if verbose:
                    log.exception("error: %s", e)
                else:
                    log.error("error: %s", e)
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

        return run

    return wrap
