"""The replica directory's ``manifest.json``: which generation it holds, of which guest, in which disks.

The names below are read by scripts and other tools: keep them stable. A generation's
manifest is written only after every disk of it is durable, atomically (a temporary
name, fsync, rename, fsync of the directory): the directory always holds one whole
generation, never disks of two.

    {"guest": "mail", "uuid": null, "generation": 3, "time": "2026-12-01T02:00:07Z",
     "consistency": "offline",
     "disks": [{"target": "vda", "file": "vda.img", "source": "/var/lib/.../mail.qcow2",
                "format": "raw", "virtual_size": 21474836480, "bitmap": "vimgtools.gen-3",
                "replica": {"dev": 2049, "ino": 1234, "size": 21474836480, "mtime_ns": ...}}]}
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vimgtools.errors import JournalError
from vimgtools.image import describe_os_error, fsync_dir

MANIFEST = "manifest.json"
UNDO_DIR = ".undo"  # in DEST while a generation is being written: its disks' undo files
BITMAP_PREFIX = "vimgtools.gen-"  # our bitmaps; others' are left alone


@dataclass
class Disk:
    target: str  # the guest's name for it: vda, vdb, ...
    file: str  # the replica, relative to DEST
    source: str  # the image it is a replica of
    format: str  # the replica's format
    virtual_size: int
    bitmap: str | None  # the dirty bitmap started in the source at this generation (None: raw source)
    replica: dict[str, int] = field(default_factory=dict)  # the replica file as this run left it


@dataclass
class Manifest:
    guest: str
    generation: int
    time: str
    consistency: str  # "offline": the guest was shut off, its disks as it left them
    disks: list[Disk]
    uuid: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def disk(self, target: str) -> Disk | None:
        return next((d for d in self.disks if d.target == target), None)


def load(dest: Path) -> Manifest | None:
    """The generation DEST holds, None for a new DEST. A damaged manifest is an error, not a new start."""
    path = dest / MANIFEST
    try:
        raw = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise JournalError(f"{path}: cannot read: {describe_os_error(e)}") from e
    try:
        obj = json.loads(raw)
    except ValueError as e:
        raise JournalError(f"{path}: not a vimgtools manifest ({e}); move it away to start over") from e
    return from_json(obj, str(path))


def from_json(obj: Any, where: str) -> Manifest:
    """A manifest read from ``where`` (a file, or the DR host's answer)."""
    try:
        obj = dict(obj)
        disks = [Disk(**d) for d in obj.pop("disks")]
        return Manifest(disks=disks, **obj)
    except (ValueError, TypeError, KeyError) as e:
        raise JournalError(f"{where}: not a vimgtools manifest ({e}); move it away to start over") from e


def save(dest: Path, manifest: Manifest) -> None:
    write_atomic(dest / MANIFEST, json.dumps(manifest.to_json(), indent=1, sort_keys=True) + "\n")


def write_atomic(path: Path, text: str) -> None:
    """``path`` holds ``text`` or what it held before, whatever happens (temporary name, fsync, rename)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise JournalError(f"{path}: cannot write: {describe_os_error(e)}") from e
