"""One run of ``replicate``: generation N of a guest copied into its replica directory.

The same steps for every kind of guest; what differs (how the disks are found, how one
moment of all of them is taken and read, how tracking is started and dropped) is the
guest's ``Backend`` (``offline``, ``qmp``, ``libvirt``):

1. the guest's disks, and for each whether the last generation's tracking can be trusted
   (its bitmap there and consistent, the size unchanged, the replica as that run left it);
2. one moment of all disks (``Backend.moment``): the next generation's tracking starts no
   later than it; each disk is read from it through sync's engine, only the extents the
   last bitmap marked when incremental, in full (comparing) otherwise;
3. once every disk is durable the manifest of N is committed; only then is older tracking
   of ours dropped (``Moment.commit``). A run that fails keeps the last generation whole
   and its tracking: the next run covers both.

Every disk written after the first generation keeps an undo file (sync's ``--undo``: the old
content of every block it overwrites) in ``DEST/.undo/`` until the manifest of N is committed.
A run that dies after some disks were written leaves the directory as a mix of N-1 and N; the
next run (or ``--recover``) first puts every disk back to N-1 (``restore``): the directory
holds one whole generation again, never disks of two.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from vimgtools.errors import InvalidInput
from vimgtools.image import Image
from vimgtools.replicate import manifest as mf
from vimgtools.replicate.dest import ReplicaDir, open_dest
from vimgtools.replicate.freeze import reap_watchdogs
from vimgtools.sync.chunks import Extents
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
    freeze_seconds: float = 0.0
    seconds: float = 0.0
    disks: list[DiskResult] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    defined: str | None = None  # --define: the clone's name where it was defined
    domain_xml: str | None = field(default=None, repr=False)  # DEST's domain.xml as committed

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in vars(self).items() if k not in ("disks", "domain_xml")}
        d["seconds"] = round(self.seconds, 3)
        d["freeze_seconds"] = round(self.freeze_seconds, 3)
        d["disks"] = [vars(x) for x in self.disks]
        return d


@dataclass(frozen=True)
class GuestDisk:
    """One disk of the guest, as its backend found it before the moment."""

    target: str  # the guest's name for it: vda, vdb, sda ...
    source: str  # the image file
    format: str  # the source's format
    virtual_size: int
    bitmaps: dict[str, bool] | None  # our bitmaps in it -> consistent; None: its format keeps none


class Moment(Protocol):
    """One point in time of all the guest's disks, readable while the guest goes on."""

    consistency: str  # "offline", "application" (filesystems frozen), "crash"
    freeze_seconds: float
    lost: dict[str, str]  # disks whose tracking turned out lost while taking the moment -> why

    def open(self, target: str) -> Image:
        """The disk at the moment (the exported bitmap's extents ``dirty_in`` when incremental)."""
        ...

    def commit(self, bitmap: str) -> None:
        """The generation whose tracking is ``bitmap`` is durable: drop older tracking of ours."""
        ...

    def tracking(self, target: str, bitmap: str) -> str | None:
        """The bitmap that records this disk's changes since this moment (None: none does)."""
        ...


class Backend(Protocol):
    name: str
    uuid: str | None

    def disks(self) -> list[GuestDisk]: ...

    def moment(
        self, bitmap: str, since: dict[str, str | None], dry_run: bool
    ) -> contextlib.AbstractContextManager[Moment]:
        """Take the moment; ``bitmap`` the next generation's tracking (started no later than it),
        ``since[target]`` the last generation's bitmap to read changes from (None: read in full)."""
        ...

    def warnings(self) -> list[str]: ...

    def domain_xml(self) -> str | None:
        """The guest's libvirt definition (inactive), for DEST/domain.xml; None: it has none."""
        ...


def decide(prev: mf.Disk | None, disk: GuestDisk, replica: dict[str, int] | None) -> tuple[str, str | None]:
    """Whether this disk can be incremental, and if not, why (said in one line and in --json)."""
    if prev is None:
        return "full", "first run"
    if disk.bitmaps is None:
        return "rescan", f"a {disk.format} disk keeps no dirty bitmap"
    if prev.bitmap is None:
        return "rescan", "the last generation started no tracking (the guest was shut off under libvirt)"
    if prev.bitmap not in disk.bitmaps:
        return "rescan", f"tracking lost: bitmap {prev.bitmap} is missing from {disk.source}"
    if not disk.bitmaps[prev.bitmap]:
        return "rescan", f"tracking lost: bitmap {prev.bitmap} is inconsistent (its QEMU was killed?)"
    if prev.virtual_size != disk.virtual_size:
        return "rescan", f"the disk was resized ({prev.virtual_size} -> {disk.virtual_size} bytes)"
    if replica is None or replica != prev.replica:  # its identity now (None: missing)
        return "rescan", "the replica changed since the last generation (or is missing)"
    return "incremental", None


def run(
    backend: Backend,
    dest: str | os.PathLike[str],
    *,
    fmt: str = "raw",
    dry_run: bool = False,
    block_size: int = 4096,
    full: bool = False,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    remote: SyncOptions | None = None,
) -> ReplicateResult:
    """Generation N of ``backend``'s guest into the replica directory ``dest`` (made if missing):
    a directory, or ``[USER@]HOST:DIR`` over ssh (``remote``: sync's ``rsh``, ``remote_python``,
    ``timeout``).

    ``full``: compare every disk in full this time (a scrub); tracking goes on as usual."""
    t0 = time.monotonic()
    if fmt not in FORMATS:
        raise InvalidInput(f"{fmt!r}: replicas are raw or qcow2", option="format")
    where = open_dest(dest, remote or SyncOptions())
    try:
        prev, identities, undo = where.prepare(dry_run)
        res = _run(
            backend, where, prev, identities, undo, fmt, dry_run, block_size, full, progress, stop, remote
        )
    finally:
        where.close()
        reap_watchdogs()
    res.seconds = time.monotonic() - t0
    return res


def _run(
    backend: Backend,
    where: ReplicaDir,
    prev: mf.Manifest | None,
    identities: dict[str, dict[str, int]],
    undo: str | None,
    fmt: str,
    dry_run: bool,
    block_size: int,
    full: bool,
    progress: Progress | None,
    stop: threading.Event | None,
    remote: SyncOptions | None,
) -> ReplicateResult:
    disks = backend.disks()
    if not disks:
        raise InvalidInput(f"{backend.name}: the guest has no disks to replicate")
    generation = (prev.generation if prev else 0) + 1
    bitmap = f"{mf.BITMAP_PREFIX}{generation}"
    if any(d.bitmaps and bitmap in d.bitmaps for d in disks):
        # Taken: by a run that failed, or by another DEST of this guest at the same generation,
        # whose next run reads from it. Never cleared under it: a name of our own instead (that
        # DEST loses its tracking when this one commits, and its next run says so and rescans).
        bitmap = f"{bitmap}.{os.urandom(3).hex()}"
    plans: list[tuple[GuestDisk, str, str, str | None, mf.Disk | None]] = []
    for d in disks:
        old = prev.disk(d.target) if prev else None
        if old is not None and old.source != d.source:
            old = None  # another image in this slot now
        file = f"{d.target}.{FORMATS[fmt]}"
        mode, reason = decide(old, d, identities.get(file))
        if full and mode == "incremental":
            mode, reason = "rescan", "asked for (--full)"
        plans.append((d, file, mode, reason, old))
    since = {
        d.target: (old.bitmap if mode == "incremental" and old else None) for d, _, mode, _, old in plans
    }
    base = remote or SyncOptions()
    with backend.moment(bitmap, since, dry_run) as m:
        res = ReplicateResult(backend.name, where.where, generation, m.consistency, dry_run)
        res.freeze_seconds = m.freeze_seconds
        res.warnings = backend.warnings()
        entries: list[mf.Disk] = []
        for d, file, mode, reason, _ in plans:
            if d.target in m.lost:
                mode, reason = "rescan", m.lost[d.target]
            if mode == "rescan":
                log.warning("%s: %s: %s; comparing in full", backend.name, d.target, reason)
            opts = base.replace(
                block_size=block_size, dry_run=dry_run, dst_format=fmt, allow_shrink=True,
                undo=f"{undo}/{file}.undo" if undo else None,
            )  # fmt: skip
            each = None if progress is None else (lambda done, total, t=d.target: progress(t, done, total))
            with m.open(d.target) as img:
                # The extents the last generation's bitmap marked, asked for once: both ends of an ssh
                # DEST compare exactly those.
                regions = Extents(img.dirty_in(0, img.size)) if mode == "incremental" else None
                r = where.sync(img, file, opts, each, stop, regions)
                size = img.size
            res.disks.append(
                DiskResult(
                    d.target, mode, reason, r.bytes_read, r.bytes_written, r.changed,
                    r.bytes_sent if where.remote else None,
                )
            )  # fmt: skip
            log.info(
                "%s: %s (%s): %s, %d blocks changed, read %d bytes",
                backend.name, d.target, d.source, mode, r.changed, r.bytes_read,
            )  # fmt: skip
            entries.append(mf.Disk(d.target, file, d.source, fmt, size, m.tracking(d.target, bitmap)))
        if not dry_run:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            res.domain_xml = where.commit(
                mf.Manifest(backend.name, generation, stamp, m.consistency, entries, backend.uuid),
                backend.domain_xml(),
            )
            m.commit(bitmap)  # the new generation is durable: older tracking of ours can go
    return res
