"""One run on one DISK, start to end: lock, work overlay, one appliance, root mounted, facts; commit or discard.

``rekernel()`` and ``rollback()`` both run inside ``guest_session``: it takes the lock beside DISK
(one run per DISK), makes the qcow2 work overlay, launches one appliance on it, mounts the chosen
root, gathers the facts and detects the loader, then hands them to the body. When the body returns,
the appliance is shut down (flushing the overlay) and, unless it is a dry run, the overlay's
changes are committed into DISK. When anything raises, the appliance is closed without a flush,
the overlay thrown away (DISK as it was), and a VimgError carries the run's ``Result`` as
``error.result``. The lock and the overlay directory are removed either way.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vimgtools.boot import Bootloader, detect
from vimgtools.errors import ImageRefused, InvalidInput, VimgError
from vimgtools.guest.facts import GuestFacts, choose_root, collect_facts
from vimgtools.guest.protocol import Guest
from vimgtools.guest.session import GuestImage
from vimgtools.rekernel.group import commit_group, recover_group
from vimgtools.rekernel.overlay import (
    commit_overlay,
    create_overlay,
    overlay_extents,
    probe_format,
    refuse_if_in_use,
)
from vimgtools.rekernel.plan import Plan

log = logging.getLogger("vimgtools.rekernel")

TMP_PREFIX = ".vimg-rekernel-"


@dataclass
class Result:
    """What a run decided and did; ``to_dict()`` is the CLI's ``--json`` object."""

    plan: Plan | None
    dry_run: bool
    committed: bool = False
    bytes_committed: int = 0
    done: list[dict[str, Any]] = field(default_factory=list)
    verified: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    action: str = "rekernel"
    disks: list[str] = field(default_factory=list)  # every DISK of the run, in the order the guest sees them
    #: the drill's report (its --json object) when --boot-check booted the work overlay
    boot_check: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "boot_check": self.boot_check,
            "action": self.action,
            "plan": self.plan.to_dict() if self.plan else None,
            "dry_run": self.dry_run,
            "committed": self.committed,
            "bytes_committed": self.bytes_committed,
            "done": self.done,
            "verified": self.verified,
            "seconds": self.seconds,
        } | ({"disks": self.disks} if len(self.disks) > 1 else {})


class Work:
    """The run's lock (one rekernel per DISK at a time) and its temporary overlay directory."""

    def __init__(self, disk: Path, fmt: str | None, workdir: Path | None) -> None:
        if not disk.exists():
            raise InvalidInput(f"{disk}: no such file or device")
        self.fmt = fmt or probe_format(disk)
        refuse_if_in_use(disk)
        where = workdir or disk.resolve().parent
        # Two runs on one DISK would each commit an overlay made against the old content: refuse.
        self._lock_path = where / f"{TMP_PREFIX}{disk.name}.lock"
        while True:
            self._lock = open(self._lock_path, "a")  # noqa: SIM115
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._lock.close()
                raise ImageRefused(f"{disk}: another vimgtools rekernel is working on this image") from None
            # The holder before us may have removed the file after we opened it: lock the one on disk.
            try:
                if os.stat(self._lock_path).st_ino == os.fstat(self._lock.fileno()).st_ino:
                    break
            except FileNotFoundError:
                pass
            self._lock.close()
        # A group commit of several disks a crash interrupted: complete or discard it first (group.py).
        try:
            recover_group(disk)
        except BaseException:
            self._lock_path.unlink(missing_ok=True)
            self._lock.close()
            raise
        # Overlays left by a run that was killed (its pid is gone) are thrown away: DISK never saw them.
        for stale in where.glob(f"{TMP_PREFIX}{disk.name}-*"):
            pid = stale.name.rsplit("-", 2)[-2]
            if stale.is_dir() and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                log.info("removing %s, left by a run that was killed", stale)
                shutil.rmtree(stale, ignore_errors=True)
        self.disk = disk
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{disk.name}-{os.getpid()}-", dir=where))
        try:
            self.overlay = create_overlay(disk, self.fmt, self.tmp)
        except BaseException:
            self.close()
            raise

    def commit(self) -> int:
        refuse_if_in_use(self.disk)  # a VM started meanwhile must not see its disk change under it
        return commit_overlay(self.overlay, self.disk, self.fmt)

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._lock_path.unlink(missing_ok=True)
        self._lock.close()


@dataclass(frozen=True)
class Session:
    """What the body of a run works with: the guest (root mounted), its facts and its loader."""

    guest: Guest
    facts: GuestFacts
    loader: Bootloader


def open_image(overlay: Path | Sequence[Path]) -> Guest:
    """The real guest: one libguestfs appliance on the work overlay(s) (the only launch of a run)."""
    if isinstance(overlay, Path):
        return GuestImage(overlay, write=True, fmt="qcow2")
    return GuestImage(overlay[0], write=True, fmt="qcow2", more=overlay[1:])


def commit_all(works: list[Work]) -> int:
    """One DISK: its overlay through the journal. Several: all or none (``group.commit_group``)."""
    if len(works) == 1:
        return works[0].commit()
    for w in works:
        refuse_if_in_use(w.disk)
    return sum(commit_group([(w.disk, overlay_extents(w.overlay)) for w in works]))


def _since(t0: float) -> float:
    return round(time.monotonic() - t0, 2)


@contextmanager
def disks_session(
    disks: Sequence[Path],
    result: Result,
    *,
    fmt: str | None = None,
    workdir: Path | None = None,
    open_guest: Callable[[Path | list[Path]], Guest] | None = None,
    before_commit: Callable[[Path], None] | None = None,
) -> Iterator[Guest]:
    """The lifecycle under every run: locks, work overlays, one appliance on them; commit or discard.

    Yields the launched guest (nothing mounted). When the body returns, the appliance is shut down
    (flushing the overlays) and, unless ``result.dry_run``, the overlays are committed: one DISK
    through its journal, several all or none (``commit_all``). When anything raises, the overlays
    are thrown away and a VimgError carries ``result`` as ``error.result``.
    """
    result.disks = [str(d) for d in disks]
    works: list[Work] = []
    try:
        try:
            for d in disks:
                works.append(Work(d, fmt, workdir))
            if len(works) > 1 and any(w.fmt != "raw" for w in works):
                bad = ", ".join(f"{w.disk} ({w.fmt})" for w in works if w.fmt != "raw")
                raise InvalidInput(f"several disks are committed together only when raw: {bad}")
            work = works[0]
            overlays = [w.overlay for w in works]
            guest = (open_guest or open_image)(work.overlay if len(works) == 1 else overlays)
            ok = False
            try:
                result.seconds["launch"] = round(guest.launch_seconds, 2)
                yield guest
                ok = True
            finally:
                t1 = time.monotonic()
                guest.close(commit=ok)
                result.seconds["shutdown"] = _since(t1)
            if before_commit is not None:
                t3 = time.monotonic()
                before_commit(work.overlay)
                result.seconds["boot_check"] = _since(t3)
            if not result.dry_run:
                t2 = time.monotonic()
                result.bytes_committed = commit_all(works)
                result.committed = True
                result.seconds["commit"] = _since(t2)
        finally:
            for w in works:
                w.close()
    except VimgError as e:
        e.result = result  # for --json: what was decided and done before it failed
        raise


@contextmanager
def guest_session(
    disk: Path | Sequence[Path],
    result: Result,
    *,
    fmt: str | None = None,
    root: str | None = None,
    workdir: Path | None = None,
    extra_files: Iterable[str] = (),
    open_guest: Callable[[Path | list[Path]], Guest] | None = None,
    before_commit: Callable[[Path], None] | None = None,
) -> Iterator[Session]:
    """Run the body on DISK's guest; commit its changes when it returns (unless ``result.dry_run``).

    Args:
        disk: the guest's disk image, or its disks in the order the guest sees them (one appliance,
            an overlay each, committed all or none: ``group``; several must be raw); only written
            by the commit.
        result: filled in as the run goes (``seconds``, ``committed``, ``bytes_committed``), and
            attached to a VimgError raised inside as ``error.result``.
        fmt, root, workdir: as ``rekernel()`` takes them.
        extra_files: guest files to read into the facts besides the loaders' configuration.
        open_guest: makes the guest on the work overlay (default: ``open_image``; tests give a
            FakeGuest).
        before_commit: called with the work overlay once the appliance has flushed it and before
            the commit (``--boot-check`` boots it); raising there leaves DISK as it was.

    Raises:
        whatever the body, the launch, the inspection or the commit raise; DISK is as it was
        unless the commit itself failed (then as ``commit_overlay`` documents).
    """
    disks = [disk] if isinstance(disk, Path) else list(disk)
    with disks_session(
        disks, result, fmt=fmt, workdir=workdir, open_guest=open_guest, before_commit=before_commit
    ) as guest:
        t0 = time.monotonic()
        chosen = choose_root(guest, root)
        guest.mount_root(chosen)
        facts = collect_facts(guest, chosen, extra_files=extra_files)
        loader = detect(facts)
        result.seconds["inspect"] = _since(t0)
        yield Session(guest, facts, loader)
