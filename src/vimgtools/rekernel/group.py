"""Committing several disks of one guest together: all of them, or (after a crash) none until recovery.

Each disk alone goes through the sync journal (``journal.apply_runs``); for a guest made of several
disks that is not enough: a crash between two disks' commits would leave one disk new and the
other old (an fstab naming a filesystem the other disk does not have yet). So a group commit is
two-phase, with one commit point for all the disks:

1. **prepare**: for every disk, its changes go into a journal of the sync format, complete and
   flushed, at a private path (``DISK.vimg-rekernel-journal``, which neither ``sync --recover`` nor
   a later ``apply_runs`` replays), and a group file ``DISK.vimg-rekernel-group`` (JSON: the group
   id, every member's disk and journal, the marker's path) beside every disk, flushed;
2. **commit point**: the marker file (``.vimg-rekernel-commit-ID`` beside the first disk) is
   created and its directory flushed;
3. **apply**: each journal is replayed into its disk (``journal.replay``: idempotent, removes the
   journal when done), then the group files go, then the marker.

Recovery (``recover_group``, run by every rekernel on a disk before anything else, under that
disk's lock, so the run that wrote the group is gone): a group file without its marker is a commit
that never happened, every member's private journal and group file are removed, no disk was
written; with the marker, every journal still there is replayed, then the files are removed. Until
then the disks must not be written by anything else (a replay would overwrite it): run rekernel
on any member again first.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Iterable
from pathlib import Path

from vimgtools.errors import ImageError, JournalError
from vimgtools.image import Image, fsync_dir
from vimgtools.journal import (
    JOURNAL_MAGIC,
    Header,
    JournalWriter,
    read_journal,
    remove_journal,
    replay,
)

log = logging.getLogger("vimgtools.rekernel")

GROUP_SUFFIX = ".vimg-rekernel-group"
JOURNAL_SUFFIX = ".vimg-rekernel-journal"
MARKER_PREFIX = ".vimg-rekernel-commit-"
GROUP_VERSION = 1


def group_path(disk: Path) -> Path:
    return disk.with_name(disk.name + GROUP_SUFFIX)


def journal_path(disk: Path) -> Path:
    return disk.with_name(disk.name + JOURNAL_SUFFIX)


def _write_durable(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _prepare(disk: Path, runs: Iterable[tuple[int, bytes]]) -> Path:
    """A complete, flushed journal of ``runs`` for ``disk`` at its private path (not applied)."""
    jpath = journal_path(disk)
    with Image(disk) as img:
        size = img.size
    writer = JournalWriter(jpath, Header(JOURNAL_MAGIC, 4096, size, size, 0))
    try:
        for offset, data in runs:
            writer.data(offset, data)
        writer.commit()  # durable and complete; inert until the group's marker exists
    except BaseException:
        writer.close()
        remove_journal(jpath)
        raise
    writer.close()
    return jpath


def _apply(disk: Path, jpath: Path) -> int:
    if not jpath.exists():
        return 0  # replayed before a crash, and removed
    with Image(disk, write=True) as img:
        img.lock_exclusive("update")
        return replay(img, jpath, read_journal(jpath))


def commit_group(members: list[tuple[Path, Iterable[tuple[int, bytes]]]]) -> list[int]:
    """Write every member's runs into its raw disk, all or none (see the module docstring).

    Returns:
        bytes written into each disk, in the order given.

    Raises:
        ImageError, JournalError: before the commit point every disk is as it was; after it the
            message says that the next rekernel run on any member completes it.
    """
    gid = uuid.uuid4().hex[:16]
    disks = [d for d, _ in members]
    marker = disks[0].with_name(MARKER_PREFIX + gid)
    record = {
        "version": GROUP_VERSION,
        "group": gid,
        "marker": str(marker.resolve()),
        "members": [{"disk": str(d.resolve()), "journal": str(journal_path(d).resolve())} for d in disks],
    }
    prepared: list[Path] = []
    try:
        for disk, runs in members:
            prepared.append(_prepare(disk, runs))
        for disk in disks:
            _write_durable(group_path(disk), json.dumps(record, indent=1) + "\n")
    except BaseException:
        for disk in disks:
            remove_journal(journal_path(disk))
            group_path(disk).unlink(missing_ok=True)
        raise
    _write_durable(marker, gid + "\n")  # the commit point: from here on, all of them
    written = []
    try:
        for disk, jpath in zip(disks, prepared, strict=True):
            written.append(_apply(disk, jpath))
    except (ImageError, JournalError) as e:
        raise type(e)(
            f"{e}; the group commit is decided: run rekernel on {disks[0]} again to complete it"
        ) from e
    _finish(record)
    return written


def _finish(record: dict[str, object]) -> None:
    members = record["members"]
    assert isinstance(members, list)
    for m in members:
        group_path(Path(m["disk"])).unlink(missing_ok=True)
    marker = Path(str(record["marker"]))
    marker.unlink(missing_ok=True)
    fsync_dir(marker.parent)


def recover_group(disk: Path) -> str | None:
    """Complete or discard a group commit a crash interrupted; returns what was done, or None.

    Raises:
        JournalError: the group file is unreadable or of another version.
    """
    gpath = group_path(disk)
    if not gpath.exists():
        return None
    try:
        record = json.loads(gpath.read_text())
        if record.get("version") != GROUP_VERSION:
            raise ValueError(f"version {record.get('version')}")
        members = [(Path(m["disk"]), Path(m["journal"])) for m in record["members"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise JournalError(f"{gpath}: not a vimgtools group commit file ({e}); move it away to go on") from e
    if Path(record["marker"]).exists():
        for d, j in members:
            n = _apply(d, j)
            log.warning("completed the interrupted group commit %s on %s (%d bytes)", record["group"], d, n)
        _finish(record)
        return "completed"
    for d, j in members:
        remove_journal(j)
        group_path(d).unlink(missing_ok=True)
    log.warning("discarded the group commit %s a crash interrupted before its commit point", record["group"])
    return "discarded"
