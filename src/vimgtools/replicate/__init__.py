"""Replicate a guest into a replica directory that always holds one whole generation.

``replicate(guest, dest)``: ``guest`` is a running QEMU's QMP socket (``"qmp:PATH"``), a
libvirt domain name, or a shut-off guest's images (a list of paths). ``generation`` is the
run every kind shares; ``offline``, ``qmp`` and ``libvirt`` are how each kind is read;
``manifest`` is the directory's ``manifest.json``. ``python -m vimgtools.replicate`` is the CLI.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

from vimgtools.replicate.generation import DiskResult, Progress, ReplicateResult, run
from vimgtools.replicate.libvirt import DEFAULT_URI, LibvirtGuest, connect, domain_disks, lookup
from vimgtools.replicate.offline import Offline
from vimgtools.replicate.qmp import QmpGuest

__all__ = ["DiskResult", "ReplicateResult", "replicate"]


def replicate(
    guest: str | Sequence[str | os.PathLike[str]],
    dest: str | os.PathLike[str],
    *,
    name: str | None = None,
    agent: str | None = None,
    uri: str = DEFAULT_URI,
    fmt: str = "raw",
    dry_run: bool = False,
    block_size: int = 4096,
    full: bool = False,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
) -> ReplicateResult:
    """Copy generation N of ``guest`` into ``dest``; the same data as the CLI's ``--json``.

    Raises:
        InvalidInput: no such guest, socket or image; a bad option (exit 2, nothing written).
        ImageRefused: an image a running QEMU holds, given as a shut-off guest's.
        VimgError: failed; DEST still holds the last whole generation.
    """
    opts = dict(fmt=fmt, dry_run=dry_run, block_size=block_size, full=full, progress=progress, stop=stop)
    if isinstance(guest, str) and guest.startswith("qmp:"):
        g = QmpGuest(guest[4:], agent=agent, name=name)
        try:
            return run(g, dest, **opts)  # type: ignore[arg-type]
        finally:
            g.close()
    if isinstance(guest, str) and not os.path.exists(guest):  # a libvirt domain's name
        conn = connect(uri)
        try:
            dom = lookup(conn, guest)
            if dom.isActive():
                return run(LibvirtGuest(dom, uri), dest, **opts)  # type: ignore[arg-type]
            disks = domain_disks(dom.XMLDesc(0))
            off = Offline(
                [p for _, p, _ in disks], name or guest, track=False, targets=[t for t, _, _ in disks]
            )
            off.uuid, off.xml = dom.UUIDString(), dom.XMLDesc(0)
            return run(off, dest, **opts)  # type: ignore[arg-type]
        finally:
            conn.close()
    images = [guest] if isinstance(guest, (str, os.PathLike)) else list(guest)
    return run(Offline(images, name), dest, **opts)  # type: ignore[arg-type]
