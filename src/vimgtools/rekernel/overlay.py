"""The work overlay: a temporary qcow2 backed by DISK that libguestfs writes, then committed into DISK.

DISK is never written while the guest is changed: a failure anywhere (or ``--dry-run``) throws the
overlay away and DISK stays byte-identical. Once the overlay is verified, its changed extents
(``qemu-img map``, depth 0) go into a raw DISK through the sync journal (``apply_runs``): a crash or
kill during the commit is completed or discarded by the next run. A qcow2 (or other format) DISK is
committed with ``qemu-img commit``, which is *not* crash-atomic: keep a copy, or convert to raw.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from vimgtools.errors import ImageError, ImageRefused, InvalidInput
from vimgtools.image import Image
from vimgtools.journal import apply_runs

log = logging.getLogger("vimgtools.rekernel")

CHUNK = 4 << 20


def _qemu_img(*args: str) -> str:
    try:
        out = subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise ImageError("qemu-img is missing (Debian/Ubuntu: qemu-utils)") from e
    except subprocess.CalledProcessError as e:
        raise ImageError(f"qemu-img {' '.join(args)}: {e.stderr.strip()}") from e
    return out.stdout


def probe_format(disk: Path) -> str:
    """The image's format as qemu-img sees it (used only when --format is not given)."""
    info = json.loads(_qemu_img("info", "--force-share", "--output=json", str(disk)))
    fmt: str = info["format"]
    return fmt


def refuse_if_in_use(disk: Path) -> None:
    """Refuse an image that a running VM holds open (QEMU's OFD locks)."""
    with Image(disk) as img:
        holder = img.qemu_lock()
    if holder:
        raise ImageRefused(f"{disk}: a running QEMU holds this image open ({holder}); shut the VM down first")


def create_overlay(disk: Path, fmt: str, directory: Path) -> Path:
    """A qcow2 in ``directory`` backed by ``disk`` (absolute path, explicit backing format)."""
    overlay = directory / (disk.name + ".rekernel.qcow2")
    _qemu_img("create", "-q", "-f", "qcow2", "-F", fmt, "-b", str(disk.resolve()), str(overlay))
    return overlay


def overlay_extents(overlay: Path, *, chunk: int = CHUNK) -> Iterator[tuple[int, bytes]]:
    """(guest offset, data) for every extent the overlay itself holds; zeros written out as zeros."""
    extents = json.loads(_qemu_img("map", "--output=json", "-f", "qcow2", str(overlay)))
    with open(overlay, "rb") as f:
        for e in extents:
            if e.get("depth", 0) != 0:
                continue  # from the backing file: unchanged
            start, length = int(e["start"]), int(e["length"])
            if e.get("data") and "offset" in e:
                host = int(e["offset"])
                done = 0
                while done < length:
                    n = min(chunk, length - done)
                    f.seek(host + done)
                    data = f.read(n)
                    if len(data) != n:
                        raise ImageError(f"{overlay}: short read at {host + done}")
                    yield start + done, data
                    done += n
            elif e.get("zero"):
                done = 0
                while done < length:
                    n = min(chunk, length - done)
                    yield start + done, bytes(n)
                    done += n
            elif e.get("data"):
                raise ImageError(f"{overlay}: extent at {start} has data but no host offset (compressed?)")


def commit_overlay(overlay: Path, disk: Path, fmt: str) -> int:
    """Write the overlay's changes into ``disk``; returns the bytes written.

    A raw disk gets them through the crash-atomic journal; any other format through
    ``qemu-img commit`` (not crash-atomic: documented in docs/rekernel.md).
    """
    if fmt == "raw":
        return apply_runs(disk, overlay_extents(overlay))
    if fmt not in ("qcow2", "qed", "vmdk", "vdi", "vhdx", "vpc"):
        raise InvalidInput(f"{disk}: cannot commit into format {fmt}")
    size = os.path.getsize(overlay)
    log.warning("%s is %s: committing with qemu-img commit, which is not crash-atomic", disk, fmt)
    _qemu_img("commit", "-q", "-f", "qcow2", str(overlay))
    return size
