"""The drill's private temporary directory: the replica's disks checked, one throw-away qcow2 overlay each.

The replica is opened read-only here (to check it) and by qemu (``read-only`` backing nodes), and
only through the overlays; nothing writes it. The directory (``vimg-drill-*`` under ``$TMPDIR``) is
held with ``flock`` while the drill runs; the overlays, sockets and UEFI variables go when it ends
and the logs stay. A drill killed with ``kill -9`` leaves its overlays: the next drill finds the
directory unlocked and removes them.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vimgtools.drill.qemu import OVMF_VARS, Drive
from vimgtools.errors import ImageRefused, InvalidInput, VimgError
from vimgtools.image import Image
from vimgtools.replicate.manifest import MANIFEST, UNDO_DIR
from vimgtools.replicate.manifest import load as load_manifest

log = logging.getLogger("vimgtools.drill")

PREFIX = "vimg-drill-"
LOCK = ".lock"
KEEP = ("serial.log", "firmware.log", "qemu.log")


@dataclass(frozen=True)
class Disk:
    """A replica's disk, checked: its path, format and whether it is a block device."""

    path: Path
    fmt: str
    block_device: bool


def check_disk(path: Path, fmt: str | None = None) -> Disk:
    """A readable image qemu understands, not held for writing by a running QEMU; else InvalidInput."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InvalidInput(f"{path}: no such file or device") from None
    except OSError as e:
        raise InvalidInput(f"{path}: {e.strerror}") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise InvalidInput(f"{path}: not a regular file or block device")
    if stat.S_ISREG(st.st_mode) and st.st_size == 0:
        raise InvalidInput(f"{path}: empty (0 bytes), nothing to boot")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise InvalidInput(f"{path}: cannot read: {e.strerror}") from None
    os.close(fd)
    with Image(path) as img:
        if img.qemu_lock() == "writer":
            raise ImageRefused(f"{path}: a running QEMU holds this image open for writing; shut that VM down")
    if fmt is None:
        fmt = probe_format(path)
    return Disk(path.absolute(), fmt, stat.S_ISBLK(st.st_mode))


def replica_disks(paths: Sequence[Path], formats: Sequence[str | None]) -> list[tuple[Path, str | None]]:
    """The disks to boot: the paths given, or a replica directory's disks in its manifest's order.

    A replica directory (``python -m vimgtools.replicate``) names its disks, their order and their
    formats in ``manifest.json``; it is given alone.
    """
    dirs = [p for p in paths if p.is_dir()]
    if not dirs:
        return list(zip(paths, [*formats, *[None] * (len(paths) - len(formats))], strict=True))
    if len(paths) > 1:
        raise InvalidInput(f"{dirs[0]}: a replica directory is given alone, without other disks")
    if formats:
        raise InvalidInput(f"{dirs[0]}: the manifest gives the formats; no --format with a replica directory")
    try:
        manifest = load_manifest(dirs[0])
    except VimgError as e:
        raise InvalidInput(str(e)) from None
    if manifest is None:
        raise InvalidInput(f"{dirs[0]}: a directory without {MANIFEST}: not a replica directory")
    if not manifest.disks:
        raise InvalidInput(f"{dirs[0] / MANIFEST}: names no disk")
    if (dirs[0] / UNDO_DIR).is_dir():
        raise InvalidInput(
            f"{dirs[0]}: a replicate run that did not finish may have left disks of two generations; "
            f"put it back first: python -m vimgtools.replicate --recover {dirs[0]}"
        )
    log.info(
        "replica of %s, generation %d (%s): %s",
        manifest.guest,
        manifest.generation,
        manifest.time,
        ", ".join(d.target for d in manifest.disks),
    )
    return [(dirs[0] / d.file, d.format) for d in manifest.disks]


def probe_format(path: Path) -> str:
    try:
        out = subprocess.run(
            ["qemu-img", "info", "--force-share", "--output=json", str(path)],
            check=True,
            capture_output=True,
            text=True,
        )
    except FileNotFoundError as e:
        raise VimgError("qemu-img is missing (Debian/Ubuntu: qemu-utils)") from e
    except subprocess.CalledProcessError as e:
        msg = e.stderr.strip().splitlines()
        raise InvalidInput(
            f"{path}: not an image qemu can read: {msg[-1] if msg else 'qemu-img failed'}"
        ) from None
    fmt: str = json.loads(out.stdout)["format"]
    return fmt


SUN_PATH_MAX = 107  # bytes of a unix socket's path (sockaddr_un.sun_path less its NUL)


class WorkDir:
    """The run's private directory (a context manager): overlays in, logs kept, the rest removed."""

    def __init__(self, parent: Path | None = None) -> None:
        base = Path(parent or tempfile.gettempdir())
        sweep(base)
        self.path = Path(tempfile.mkdtemp(prefix=PREFIX, dir=base))
        self._lock = os.open(self.path / LOCK, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        self._sockets: Path | None = None

    def socket(self, name: str) -> Path:
        """Where QEMU makes a unix socket: here, or where the path would be too long for one
        (``--workdir`` deep down), in a short private directory under /tmp, removed with this one."""
        p = self.path / name
        if len(os.fsencode(p)) <= SUN_PATH_MAX:
            return p
        if self._sockets is None:
            self._sockets = Path(tempfile.mkdtemp(prefix=PREFIX + "sock-", dir="/tmp"))
        return self._sockets / name

    def overlay(self, index: int, disk: Disk) -> Drive:
        ov = self.path / f"disk{index}.qcow2"
        try:
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", "-F", disk.fmt, "-b", str(disk.path), str(ov)],
                check=True,
                capture_output=True,
                text=True,
            )
        except subprocess.CalledProcessError as e:
            raise InvalidInput(f"{disk.path}: cannot make an overlay over it: {e.stderr.strip()}") from None
        return Drive(disk.path, disk.fmt, ov, disk.block_device)

    def uefi_vars(self) -> Path:
        if not OVMF_VARS.exists():
            raise InvalidInput(f"uefi: {OVMF_VARS} is missing (Debian/Ubuntu: apt-get install ovmf)")
        dst = self.path / "uefi-vars.fd"
        shutil.copyfile(OVMF_VARS, dst)
        return dst

    def close(self, *, keep_logs: bool) -> None:
        """Remove everything but the logs (all of it with ``keep_logs=False``), then unlock."""
        qemu_log = self.path / "qemu.log"
        if qemu_log.exists() and qemu_log.stat().st_size == 0:
            qemu_log.unlink()  # qemu said nothing
        clean(self.path, keep=KEEP if keep_logs else ())
        if not keep_logs:
            shutil.rmtree(self.path, ignore_errors=True)
        if self._sockets is not None:
            shutil.rmtree(self._sockets, ignore_errors=True)
        os.close(self._lock)

    def __enter__(self) -> WorkDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(keep_logs=True)


def clean(path: Path, *, keep: tuple[str, ...]) -> None:
    for p in path.iterdir():
        if p.name in keep or p.name == LOCK:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def sweep(base: Path) -> None:
    """Remove the overlays of drills that died (their directory is no longer locked)."""
    for d in base.glob(PREFIX + "*"):
        lock = d / LOCK
        try:
            if not lock.exists() or not any(p.suffix == ".qcow2" for p in d.iterdir()):
                continue
        except OSError:
            continue  # another user's
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue  # a drill is running there
        try:
            log.info("removing the overlays of a drill that did not finish: %s", d)
            clean(d, keep=KEEP)
        finally:
            os.close(fd)
