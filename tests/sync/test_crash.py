"""kill -9 and SIGTERM in the middle of a sync: DST is old or new, never an undetected mix."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from synchelp import MiB, cli, cli_json, digest, write_image

from vimgtools.journal import committed_journal

SIZE = 128 * MiB


@pytest.fixture(scope="module")
def generations(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str, str]:
    """An old replica and a new source differing in ~20% of their pages, scattered and in runs."""
    d = tmp_path_factory.mktemp("crash")
    old = write_image(d / "old.img", SIZE, [(0, SIZE - 16 * MiB)], seed=11)
    src = d / "src.img"
    shutil.copyfile(old, src)
    rng = np.random.default_rng(12)
    with open(src, "r+b") as f:
        for page in rng.choice(SIZE // 4096, SIZE // 4096 // 6, replace=False):
            f.seek(int(page) * 4096)
            f.write(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
        f.seek(100 * MiB)
        f.write(bytes(8 * MiB))  # a run that becomes a hole
    return old, src, digest(old), digest(src)


def start(src: Path, dst: Path, stderr: int = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "vimgtools.sync", "-q", str(src), str(dst)],
        stdout=subprocess.DEVNULL,
        stderr=stderr,
    )


def journal_state(dst: Path) -> str:
    j = dst.with_name(dst.name + ".vimg-journal")
    if not j.exists():
        return "none"
    return "committed" if committed_journal(j) is not None else "scanning"


@pytest.mark.slow
def test_kill_9_anywhere_then_recover(generations: tuple[Path, Path, str, str], tmp_path: Path) -> None:
    old, src, old_sum, new_sum = generations
    dst = tmp_path / "dst.img"
    shutil.copyfile(old, dst)
    t0 = time.monotonic()
    cli(src, dst)
    full = time.monotonic() - t0
    assert digest(dst) == new_sum
    seen: dict[str, int] = {}
    points = [full * k / 14 for k in range(1, 14)]
    for _attempt in range(3):
        for delay in points:
            shutil.copyfile(old, dst)
            p = start(src, dst)
            time.sleep(delay)
            p.send_signal(signal.SIGKILL)
            p.wait()
            state = journal_state(dst)
            now = digest(dst)
            seen[state] = seen.get(state, 0) + 1
            if state != "committed":
                # Not committed: dst must be untouched (or already complete, if the run finished).
                assert now in (old_sum, new_sum), f"undetected mix after kill at {delay:.2f}s ({state})"
            r = cli_json("--recover", dst)
            assert digest(dst) in (old_sum, new_sum), f"mix after recovery (kill at {delay:.2f}s)"
            if state == "committed":
                assert r["recovered"] is True and digest(dst) == new_sum
            cli(src, dst)  # the next run completes (and resumes a scan)
            assert digest(dst) == new_sum
        if seen.get("committed") and seen.get("scanning"):
            break
        points = [full * (0.6 + k / 30) for k in range(12)]  # look closer at the end
    assert seen.get("scanning") and seen.get("committed"), f"kills did not hit both phases: {seen}"


def _wait_for_journal(dst: Path, p: subprocess.Popen[bytes], nbytes: int) -> None:
    j = dst.with_name(dst.name + ".vimg-journal")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and p.poll() is None:
        if j.exists() and j.stat().st_size > nbytes:
            return
        time.sleep(0.002)
    raise AssertionError("the sync never wrote its journal")


@pytest.mark.slow
def test_interrupted_scan_resumes(generations: tuple[Path, Path, str, str], tmp_path: Path) -> None:
    old, src, old_sum, new_sum = generations
    dst = tmp_path / "dst.img"
    shutil.copyfile(old, dst)
    p = start(src, dst)
    _wait_for_journal(dst, p, 4 * MiB)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert journal_state(dst) == "scanning" and digest(dst) == old_sum
    r = cli_json(src, dst)
    assert r["resumed_from"] > 0
    assert digest(dst) == new_sum


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_stops_cleanly_and_says_how_to_resume(
    generations: tuple[Path, Path, str, str], tmp_path: Path, sig: signal.Signals
) -> None:
    old, src, old_sum, new_sum = generations
    dst = tmp_path / "dst.img"
    shutil.copyfile(old, dst)
    p = start(src, dst, stderr=subprocess.PIPE)
    _wait_for_journal(dst, p, 2 * MiB)
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert b"run the same command again to resume" in err
    assert digest(dst) == old_sum
    assert cli_json(src, dst)["resumed_from"] > 0
    assert digest(dst) == new_sum
