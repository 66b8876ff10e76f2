"""Replicate a shut-off guest: its images read directly, only what their dirty bitmaps marked.

Each run is one generation N. For every disk, before it is read, a persistent dirty bitmap
``vimgtools.gen-N`` is started in the source (``qemu-img bitmap --add``: the next run's
tracking exists no later than this run's moment). The disk is then copied with sync's
engine into DEST: incremental when the last generation's bitmap is there, consistent, and
the replica is exactly as the last run left it (only the extents that bitmap marks are read
and compared); otherwise a full compare, with the reason said. Once every disk is durable
the manifest of generation N is committed; only then are the older bitmaps of ours removed.
A run that fails keeps the last generation whole and its bitmap: the next one covers both.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from vimgtools.errors import ImageRefused, InvalidInput
from vimgtools.formats import ImageInfo, add_bitmap, inspect, remove_bitmap
from vimgtools.image import Image
from vimgtools.replicate import manifest as mf
from vimgtools.sync.local import sync_local
from vimgtools.sync.options import SyncOptions

log = logging.getLogger("vimgtools.replicate")

Progress = Callable[[str, int, int], None]  # (disk target, bytes done, bytes total)
FORMATS = {"raw": "img", "qcow2": "qcow2"}


@dataclass
class DiskResult:
    target: str
    mode: str  # "full" (first run), "incremental", "rescan" (tracking lost: full compare)
    reason: str | None  # why not incremental
    bytes_read: int = 0
    bytes_written: int = 0
    changed: int = 0
    bytes_sent: int | None = None  # over ssh (not built yet): None


@dataclass
class ReplicateResult:
    """``to_dict()`` is the ``--json`` object."""

    guest: str
    dest: str
    generation: int
    consistency: str
    dry_run: bool
    freeze_seconds: float = 0.0  # a shut-off guest needs no freeze
    seconds: float = 0.0
    disks: list[DiskResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in vars(self).items() if k != "disks"}
        d["seconds"] = round(self.seconds, 3)
        d["disks"] = [vars(x) for x in self.disks]
        return d


def _target(i: int) -> str:
    return "vd" + "abcdefghijklmnopqrstuvwxyz"[i] if i < 26 else f"vd{i}"


def _identity(path: Path) -> dict[str, int]:
    st = os.stat(path)
    return {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _mode(prev: mf.Disk | None, info: ImageInfo, replica: Path) -> tuple[str, str | None]:
    """Whether this disk can be incremental, and if not, why (said in one line and in --json)."""
    if prev is None:
        return "full", "first run"
    if info.format != "qcow2":
        return "rescan", f"a {info.format} source keeps no dirty bitmap"
    bitmap = next((b for b in info.bitmaps if b.name == prev.bitmap), None)
    if bitmap is None:
        return "rescan", f"tracking lost: bitmap {prev.bitmap} is missing from the source"
    if not bitmap.consistent:
        return "rescan", f"tracking lost: bitmap {prev.bitmap} is inconsistent ({', '.join(bitmap.flags)})"
    if prev.virtual_size != info.virtual_size:
        return "rescan", f"the disk was resized ({prev.virtual_size} -> {info.virtual_size} bytes)"
    if not replica.exists() or _identity(replica) != prev.replica:
        return "rescan", "the replica changed since the last generation (or is missing)"
    return "incremental", None


def replicate_offline(
    images: Sequence[str | os.PathLike[str]],
    dest: str | os.PathLike[str],
    *,
    name: str | None = None,
    fmt: str = "raw",
    dry_run: bool = False,
    block_size: int = 4096,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
) -> ReplicateResult:
    """Copy a shut-off guest's images (in the guest's order) into the replica directory ``dest``.

    Raises:
        InvalidInput: no images, a missing one, an unknown replica format.
        ImageRefused: an image a running QEMU holds (a running guest goes through libvirt or QMP).
        ImageError, JournalError: failed; DEST still holds the last whole generation.
    """
    t0 = time.monotonic()
    if not images:
        raise InvalidInput("no images given")
    if fmt not in FORMATS:
        raise InvalidInput(f"{fmt!r}: replicas are raw or qcow2", option="format")
    paths = [Path(i) for i in images]
    dest_path = Path(dest)
    for p in paths:
        with Image(p) as img:  # refuses what is missing or not an image, before anything is made
            if img.qemu_lock():
                raise ImageRefused(
                    f"{p}: a running VM (QEMU) holds it: a running guest is replicated through libvirt or "
                    "QMP, which this vimgtools cannot do yet; shut the guest off, or use vimgtools.sync "
                    "(crash-consistent only)"
                )
    if not dest_path.is_dir():
        if not dest_path.parent.is_dir():
            raise InvalidInput(f"{dest_path}: directory {dest_path.parent} does not exist")
        if not dry_run:
            dest_path.mkdir()
    prev = mf.load(dest_path) if dest_path.is_dir() else None
    with contextlib.ExitStack() as stack:
        # A dry run into a DEST still to be made compares against replicas that do not exist yet.
        where = dest_path if dest_path.is_dir() else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        return _run(paths, dest_path, where, prev, name, fmt, dry_run, block_size, progress, stop, t0)


def _run(
    paths: list[Path],
    dest_path: Path,
    where: Path,
    prev: mf.Manifest | None,
    name: str | None,
    fmt: str,
    dry_run: bool,
    block_size: int,
    progress: Progress | None,
    stop: threading.Event | None,
    t0: float,
) -> ReplicateResult:
    guest = name or (prev.guest if prev else paths[0].stem)
    generation = (prev.generation if prev else 0) + 1
    res = ReplicateResult(guest, str(dest_path), generation, "offline", dry_run)
    bitmap = f"{mf.BITMAP_PREFIX}{generation}"
    disks: list[mf.Disk] = []
    for i, src in enumerate(paths):
        target = _target(i)
        info = inspect(src, None)
        if info.virtual_size < 0:  # raw: qemu-img was not asked
            with Image(src) as img:
                info = replace(info, virtual_size=img.size)
        old = prev.disk(target) if prev else None
        if old is not None and Path(old.source) != src.resolve():
            old = None  # another image in this slot now
        replica = where / f"{target}.{FORMATS[fmt]}"
        mode, reason = _mode(old, info, replica)
        if reason and mode == "rescan":
            log.warning("%s: %s: %s; comparing in full", guest, target, reason)
        tracking = info.format == "qcow2"
        if tracking and not dry_run:
            if any(b.name == bitmap for b in info.bitmaps):  # left by a run that failed: start it afresh
                remove_bitmap(src, bitmap)
            add_bitmap(src, bitmap)  # before the disk is read: the next generation's tracking
        opts = SyncOptions(block_size=block_size, dry_run=dry_run, dst_format=fmt, allow_shrink=True)
        each = None if progress is None else (lambda done, total, t=target: progress(t, done, total))
        r = sync_local(
            src, replica, opts, progress=each, stop=stop,
            since_bitmap=old.bitmap if mode == "incremental" and old is not None else None,
        )  # fmt: skip
        res.disks.append(DiskResult(target, mode, reason, r.bytes_read, r.bytes_written, r.changed))
        log.info(
            "%s: %s (%s): %s, %d blocks changed, read %d bytes",
            guest,
            target,
            src,
            mode,
            r.changed,
            r.bytes_read,
        )
        disks.append(
            mf.Disk(
                target, replica.name, str(src.resolve()), fmt, info.virtual_size, bitmap if tracking else None,
                {} if dry_run else _identity(replica),
            )
        )  # fmt: skip
    if not dry_run:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        mf.save(
            dest_path, mf.Manifest(guest, generation, stamp, "offline", disks, prev.uuid if prev else None)
        )
        for src in paths:  # the new generation is durable: older bitmaps of ours can go
            for b in inspect(src, None).bitmaps:
                if b.name.startswith(mf.BITMAP_PREFIX) and b.name != bitmap:
                    remove_bitmap(src, b.name)
    res.seconds = time.monotonic() - t0
    return res
