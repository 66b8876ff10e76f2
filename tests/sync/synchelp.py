"""Helpers for the sync tests: real sparse files, the real CLI in a subprocess."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pytest

MiB = 1 << 20


def write_image(path: Path, size: int, extents: Iterable[tuple[int, int]], seed: int = 0) -> Path:
    """A sparse file of ``size`` with random data in ``extents`` (the rest are holes)."""
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for off, n in extents:
            f.seek(off)
            f.write(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
    return path


def poke(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def data_extents(path: Path) -> list[tuple[int, int]]:
    """Allocated extents by SEEK_DATA/SEEK_HOLE: allocation, not content."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size, pos = os.fstat(fd).st_size, 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end - start))
            pos = end
    finally:
        os.close(fd)
    return out


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def cli(*args: str | Path, check: int | None = 0, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``python -m vimgtools.sync`` and (optionally) check its exit code."""
    p = subprocess.run(
        [sys.executable, "-m", "vimgtools.sync", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check is not None:
        assert p.returncode == check, f"exit {p.returncode}, stderr: {p.stderr}"
    return p


def cli_json(*args: str | Path) -> dict[str, object]:
    p = cli("--json", *args)
    return json.loads(p.stdout)  # type: ignore[no-any-return]


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (loop devices, mounts)")


FAKE_RSH = f"{sys.executable} {Path(__file__).with_name('fake_rsh.py')}"
# The far side runs this venv's Python (it has vimgtools); `sh -c` execs it after `exec`.
REMOTE = ("--rsh", FAKE_RSH, "--remote-python", sys.executable)


def kill_far_side_mid_push(*args: str | Path, journal: Path, pidfile: Path) -> bytes:
    """Run a push through the fake rsh, kill -9 the whole far side once the journal passed 20 MiB.

    Returns the client's stderr; the client must have failed with exit 1.
    """
    env = dict(os.environ, FAKE_RSH_PIDFILE=str(pidfile))
    client = subprocess.Popen(
        [sys.executable, "-m", "vimgtools.sync", *REMOTE, *map(str, args)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while not (journal.exists() and journal.stat().st_size > 20 * MiB) and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(int(pidfile.read_text()), signal.SIGKILL)
    _, err = client.communicate(timeout=60)
    assert client.returncode == 1, err
    return err


@contextlib.contextmanager
def qemu_holding(disk: Path, fmt: str = "raw") -> Iterator[None]:
    """A real (paused, TCG) qemu-system-x86_64 with ``disk`` as its virtio disk, until the block ends.

    qemu-system-x86_64 is installed by the Makefile: a missing one fails the test, it is not skipped.
    """
    from vimgtools.image import Image

    vm = subprocess.Popen(
        [
            "qemu-system-x86_64", "-S", "-nodefaults", "-display", "none", "-accel", "tcg",
            "-m", "64", "-drive", f"file={disk},format={fmt},if=virtio",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        with Image(disk) as img:
            while img.qemu_lock() is None:
                assert vm.poll() is None, f"qemu exited: {vm.stderr.read() if vm.stderr else ''!r}"
                assert time.monotonic() < deadline, "qemu never locked its disk"
                time.sleep(0.1)
        yield
    finally:
        vm.kill()
        vm.communicate()
