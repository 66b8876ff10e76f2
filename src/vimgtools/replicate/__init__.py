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
from pathlib import Path
from typing import Any

from vimgtools.errors import InvalidInput
from vimgtools.replicate.dest import open_dest
from vimgtools.replicate.generation import DiskResult, Progress, ReplicateResult, run
from vimgtools.replicate.offline import Offline
from vimgtools.sync.options import SyncOptions
from vimgtools.sync.ssh import split_remote

__all__ = ["DiskResult", "ReplicateResult", "recover", "replicate"]

DEFAULT_URI = "qemu:///system"  # libvirt's system daemon
IMAGE_SUFFIXES = {".img", ".raw", ".qcow2", ".qcow", ".vmdk", ".vdi", ".vhd", ".vhdx", ".qed"}


def recover(
    dest: str | os.PathLike[str],
    *,
    dry_run: bool = False,
    rsh: str = "ssh",
    remote_python: str = "python3",
    timeout: float = 300.0,
) -> list[str]:
    """Put DEST (a directory or ``[USER@]HOST:DIR``) back to the generation its manifest says after a
    run that died writing it (every run does it first). Returns the replica files put back."""
    where = open_dest(dest, SyncOptions(rsh=rsh, remote_python=remote_python, timeout=timeout))
    try:
        return where.recover(dry_run)
    finally:
        where.close()


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
    define: str | None = None,
    as_name: str | None = None,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    rsh: str = "ssh",
    remote_python: str = "python3",
    timeout: float = 300.0,
) -> ReplicateResult:
    """Copy generation N of ``guest`` into ``dest``; the same data as the CLI's ``--json``.

    ``dest``: a directory, or ``[USER@]HOST:DIR`` on the DR host over ssh (``rsh``, the command that
    reaches it; ``remote_python``, the Python there that has vimgtools; ``timeout``, seconds of its
    silence before giving up), as sync's remote.

    ``define``: a libvirt URI where the clone is then defined (inactive, never started) from
    DEST/domain.xml, named ``as_name`` (default: the guest's); a libvirt guest only.

    Raises:
        InvalidInput: no such guest, socket or image; a bad option (exit 2, nothing written).
        ImageRefused: an image a running QEMU holds, given as a shut-off guest's.
        VimgError: failed; DEST still holds the last whole generation.
    """
    remote = SyncOptions(rsh=rsh, remote_python=remote_python, timeout=timeout)
    opts = dict(
        fmt=fmt,
        dry_run=dry_run,
        block_size=block_size,
        full=full,
        progress=progress,
        stop=stop,
        remote=remote,
    )
    if define is not None and not (
        isinstance(guest, str) and not guest.startswith("qmp:") and not os.path.exists(guest)
    ):
        raise InvalidInput(
            "--define needs a libvirt guest (its definition is what is cloned)", option="define"
        )
    # Each kind's backend is imported for that kind alone: QEMU's QMP library brings asyncio and
    # ssl, the libvirt backend its XML, define and bindings code (~0.1 s of a run's start together).
    if isinstance(guest, str) and guest.startswith("qmp:"):
        from vimgtools.replicate.qmp import QmpGuest

        g = QmpGuest(guest[4:], agent=agent, name=name)
        try:
            return run(g, dest, **opts)  # type: ignore[arg-type]
        finally:
            g.close()
    if (
        isinstance(guest, str)
        and not os.path.exists(guest)
        and ("/" in guest or Path(guest).suffix in IMAGE_SUFFIXES)
    ):
        raise InvalidInput(f"{guest}: no such image (a libvirt domain's name has no '/' nor image suffix)")
    if isinstance(guest, str) and not os.path.exists(guest):  # a libvirt domain's name
        return _libvirt(guest, dest, uri, name, define, as_name, opts)
    images = [guest] if isinstance(guest, (str, os.PathLike)) else list(guest)
    return run(Offline(images, name), dest, **opts)  # type: ignore[arg-type]


def _libvirt(
    guest: str, dest: str | os.PathLike[str], uri: str, name: str | None, define: str | None,
    as_name: str | None, opts: dict[str, Any],
) -> ReplicateResult:  # fmt: skip
    from vimgtools.replicate.define import check_can_define
    from vimgtools.replicate.define import define as define_clone
    from vimgtools.replicate.libvirt import LibvirtGuest, connect, domain_disks, libvirt_module, lookup

    conn = connect(uri)
    clones = connect(define) if define is not None else None
    try:
        dom = lookup(conn, guest)
        clone_name = as_name or dom.name()
        if clones is not None:  # refused before anything is written
            check_can_define(clones, libvirt_module(), clone_name, None if as_name else dom.UUIDString())
        backend: LibvirtGuest | Offline
        if dom.isActive():
            backend = LibvirtGuest(dom, uri)
        else:
            disks = domain_disks(dom.XMLDesc(0))
            backend = Offline(
                [p for _, p, _ in disks], name or guest, track=False, targets=[t for t, _, _ in disks]
            )
            backend.uuid, backend.xml = dom.UUIDString(), dom.XMLDesc(0)
        res = run(backend, dest, **opts)
        if clones is not None and not opts["dry_run"]:
            assert res.domain_xml is not None  # a libvirt guest's generation has its definition
            remote = split_remote(os.fspath(dest))[0] is not None
            mark = res.dest if remote else str(Path(dest).resolve())  # where the replicas are
            res.defined = define_clone(
                clones, libvirt_module(), res.domain_xml, mark, res.generation, clone_name
            )
        return res
    finally:
        conn.close()
        if clones is not None:
            clones.close()
