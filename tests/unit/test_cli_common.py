"""Shared CLI parts: size arguments and the ``entry`` wrapper's exit codes and error lines."""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator

import pytest

from vimgtools import _cli
from vimgtools.errors import ImageError, ImageRefused, Interrupted, InvalidInput, KernelError, VimgError

# ---------------------------------------------------------------------------
# parse_size
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("0", 0),
        ("4096", 4096),
        ("64K", 64 << 10),
        ("64k", 64 << 10),
        ("64KiB", 64 << 10),
        ("64kib", 64 << 10),
        ("64KB", 64 << 10),
        ("1M", 1 << 20),
        ("16MiB", 16 << 20),
        ("2G", 2 << 30),
        ("3T", 3 << 40),
        (" 64K ", 64 << 10),
        ("512B", 512),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert _cli.parse_size(text) == size


@pytest.mark.parametrize(
    "text", ["", " ", "K", "B", "KiB", "-1", "-4K", "1.5M", "abc", "64X", "0x10", "1 M", "1_000", "M1"]
)
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=r"not a size: .* \(use e\.g\. 4096, 64K, 1M\)"):
        _cli.parse_size(text)


def test_parse_size_as_argparse_type(capsys: pytest.CaptureFixture[str]) -> None:
    p = argparse.ArgumentParser(prog="tool")
    p.add_argument("--block-size", type=_cli.parse_size)
    assert p.parse_args(["--block-size", "1M"]).block_size == 1 << 20
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--block-size", "lots"])
    assert e.value.code == 2
    assert "not a size: 'lots'" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# entry: exceptions -> exit codes, one line on stderr, traceback only with -v
# ---------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _restore_logger() -> Iterator[None]:
    """entry() configures the "vimgtools" logger; give the next test the logger it had."""
    log = logging.getLogger("vimgtools")
    saved = (log.handlers[:], log.level, log.propagate)
    yield
    log.handlers[:], log.level, log.propagate = saved


def raising(exc: BaseException) -> Callable[..., int]:
    @_cli.entry("tool")
    def main(argv: list[str] | None = None) -> int:
        raise exc

    return main


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (VimgError("it broke"), 1),
        (ImageError("/tmp/x.img: short read at offset 4096"), 1),
        (InvalidInput("--block-size 3000 is not a power of two"), 2),
        (ImageRefused("/tmp/x.img: in use by QEMU"), 2),
        (KernelError("no kernel in /srv/k"), 2),
        (Interrupted("stopped; run again to resume"), 130),
    ],
    ids=lambda x: type(x).__name__ if isinstance(x, BaseException) else str(x),
)
def test_vimg_error_gives_its_exit_code_and_one_line(
    capsys: pytest.CaptureFixture[str], exc: VimgError, code: int
) -> None:
    assert raising(exc)([]) == code == exc.exit_code
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"tool: error: {exc}\n"


@pytest.mark.parametrize("flag", ["-v", "-vv", "--verbose"])
def test_traceback_only_with_verbose(capsys: pytest.CaptureFixture[str], flag: str) -> None:
    assert raising(ImageError("/tmp/x.img: unreadable"))(["disk.img", flag]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tool: error: /tmp/x.img: unreadable\n")
    assert "Traceback (most recent call last)" in err
    assert "raise exc" in err


@pytest.mark.parametrize("argv", [["-n"], ["--dry-run", "-q"], ["-vx"], ["--verbosity"]])
def test_no_traceback_without_verbose(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    assert raising(ImageError("bad"))(argv) == 1
    assert capsys.readouterr().err == "tool: error: bad\n"


def test_argv_none_reads_sys_argv(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "argv", ["tool", "-v"])
    assert raising(ImageError("bad"))() == 1
    assert "Traceback" in capsys.readouterr().err


def test_success_passes_the_code_through(capsys: pytest.CaptureFixture[str]) -> None:
    @_cli.entry("tool")
    def main(argv: list[str] | None = None) -> int:
        """Docstring kept."""
        print("result")
        return 0 if argv == ["ok"] else 3

    assert main(["ok"]) == 0
    assert main(["other"]) == 3
    assert capsys.readouterr() == ("result\nresult\n", "")
    assert main.__name__ == "main"
    assert main.__doc__ == "Docstring kept."


def test_keyboard_interrupt_is_130(capsys: pytest.CaptureFixture[str]) -> None:
    assert raising(KeyboardInterrupt())([]) == 130
    assert capsys.readouterr().err == "tool: interrupted\n"


def test_a_bug_shows_its_traceback() -> None:
    """Anything that is not a VimgError is not ours to hide."""
    with pytest.raises(ZeroDivisionError):
        raising(ZeroDivisionError("bug"))([])


def test_other_os_errors_propagate() -> None:
    with pytest.raises(FileNotFoundError):
        raising(FileNotFoundError(2, "No such file"))([])


BROKEN_PIPE = textwrap.dedent(
    """
    from vimgtools import _cli

    @_cli.entry("tool")
    def main(argv=None):
        for i in range(10_000_000):
            print("line", i)
        return 0

    raise SystemExit(main())
    """
)


def test_broken_pipe_exits_quietly() -> None:
    """``tool | head -1``: exit 1, nothing on stderr (no traceback, no 'Exception ignored')."""
    with subprocess.Popen(
        [sys.executable, "-c", BROKEN_PIPE], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as p:
        assert p.stdout is not None and p.stderr is not None
        assert p.stdout.readline() == b"line 0\n"
        p.stdout.close()
        err = p.stderr.read()
        assert p.wait(timeout=60) == 1
    assert err == b""
