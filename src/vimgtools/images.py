"""``open_image``: the one place that decides how an image is opened — directly, or through NBD.

Raw files and block devices are ``image.Image``s; every other format (by the rule in
``formats``) an ``nbd.NbdImage``, the same interface over a private export. Everything
above (sync's local and remote paths, signatures, deltas, ``--state``, ``--verify``,
``--undo``, ``--recover``) works on either without knowing which.
"""

from __future__ import annotations

import os
from pathlib import Path

from vimgtools.errors import ImageRefused, InvalidInput
from vimgtools.formats import check_format_name, inspect, may_be_formatted
from vimgtools.image import Image


def open_image(
    path: str | os.PathLike[str],
    *,
    fmt: str | None = None,
    write: bool = False,
    force: bool = False,
    option: str = "format",
    bitmap: str | None = None,
) -> Image:
    """Open an existing image in its format.

    Args:
        fmt: the format, never probed when given; None: decided by the rule in ``formats``.
        write: open for writing.
        force: with ``write``: write even while a running QEMU holds the image (its locks ignored).
        option: the option that gave ``fmt``, named in errors (``src_format``, ``dst_format``).
        bitmap: export this persistent dirty bitmap too (a qcow2's): ``NbdImage.dirty_in``.

    Raises:
        InvalidInput: no such file, not a file or block device, an unknown format name.
        ImageRefused: damaged, encrypted, a backing file missing, a format under another's name.
        ImageError: it cannot be opened or exported.

    A non-raw image's export is a child process that dies with the thread that opened it:
    open images from a thread that outlives their use (the main thread, in the CLIs).
    """
    p = Path(path)
    if fmt is not None:
        check_format_name(fmt, option)
    probe = Image(p, write=write and fmt in (None, "raw"))  # refuses FIFOs and the like before qemu-img
    if fmt == "raw" or (fmt is None and probe.is_block):
        if bitmap is not None:
            probe.close()
            raise InvalidInput(f"{p}: a raw image has no dirty bitmaps (only qcow2 keeps them)")
        return probe
    if fmt is None and not _may_be_formatted(probe):  # raw: no qemu-img needed
        if bitmap is not None:
            probe.close()
            raise InvalidInput(f"{p}: a raw image has no dirty bitmaps (only qcow2 keeps them)")
        return probe
    holder = probe.qemu_lock()  # before our own export locks the file
    try:
        if write:
            refuse_if_held(p, holder, force)
        info = inspect(p, fmt, force_share=holder is not None)
    except BaseException:
        probe.close()
        raise
    if bitmap is not None and info.format != "qcow2":
        probe.close()
        raise InvalidInput(f"{p}: a {info.format} image has no dirty bitmaps (only qcow2 keeps them)")
    if info.format == "raw":
        if write and not probe.write:
            probe.close()
            return Image(p, write=True)
        return probe
    probe.close()
    # Loaded only for an image in another format: nbd brings libnbd's bindings, sockets and the
    # export's machinery, 10-30 ms of every run's start otherwise (raw is the common case).
    from vimgtools.nbd import NbdImage

    return NbdImage(info, write=write, holder=holder, force=force, bitmap=bitmap)


def refuse_if_held(path: Path, holder: str | None, force: bool) -> None:
    """A running QEMU holds the image to be written: refused (exit 2) unless ``force``."""
    if holder and not force:
        raise ImageRefused(
            f"{path}: a running VM (QEMU) holds this image open as {holder}; "
            "stop it first, or use --force to write it anyway"
        )


def _may_be_formatted(img: Image) -> bool:
    """Read the image's first and last sector (giving back the pages if we brought them in)."""
    head, tail = memoryview(bytearray(512)), memoryview(bytearray(512))
    img.read_back(head, 0)
    img.read_back(tail, max(0, img.size - 512))
    return may_be_formatted(bytes(head), bytes(tail))
