"""``sync()``: the one entry point: a local sync, a push or a pull, chosen by the paths given."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vimgtools.sync.local import sync_local
from vimgtools.sync.options import SyncOptions
from vimgtools.sync.remote import sync_remote
from vimgtools.sync.result import SyncResult
from vimgtools.sync.ssh import split_remote


def sync(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    options: SyncOptions | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
    stop: threading.Event | None = None,
    **option_values: Any,
) -> SyncResult:
    """Make ``dst`` a byte-identical copy of ``src``, writing only what differs.

    Args:
        src: image file or block device to copy from (only read), or ``[user@]host:path``.
        dst: replica: file (created sparse if missing, resized to ``src``) or block device,
            or ``[user@]host:path``. One side must be on this host.
        options: a ``SyncOptions``; or give its fields as keywords (``block_size=65536``),
            applied on top of it.
        progress: called with (bytes done, bytes total) after each chunk.
        stop: when set, stop at the next chunk boundary (resumable) and raise ``Interrupted``.

    Returns:
        A ``SyncResult`` with the figures.

    Raises:
        InvalidInput, ImageRefused: refused before any write (exit 2).
        ImageError, JournalError, TransportError: failed; ``dst`` as it was, or completed by ``recover``.
        Interrupted: stopped by ``stop``; run again to resume.
    """
    opts = options or SyncOptions()
    if option_values:
        opts = opts.replace(**option_values)  # validated again
    t0 = time.monotonic()
    if split_remote(os.fspath(src))[0] or split_remote(os.fspath(dst))[0]:
        res = sync_remote(os.fspath(src), os.fspath(dst), opts, progress=progress, stop=stop)
    else:
        res = sync_local(Path(src), Path(dst), opts, progress=progress, stop=stop)
    res.seconds = time.monotonic() - t0
    return res
