"""vimgtools: replicate VM disk images by changed blocks, swap a guest's kernel offline.

Public names are re-exported here; this module never imports guestfs.
"""

from __future__ import annotations

import os
import sys
from typing import Any

# Run as a command (`python -m vimgtools.…`: argv[0] is "-m" while the package loads), before
# numpy loads: OpenBLAS would start a spinning thread per core for linear algebra we never do,
# taking CPU from the hashing threads (0.1-0.2 s of a 1 s sync on 2 cores). Library users are
# left alone.
if sys.argv[:1] == ["-m"] and "numpy" not in sys.modules:
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from vimgtools.errors import (
    BootloaderError,
    GuestError,
    ImageError,
    ImageRefused,
    Interrupted,
    InvalidInput,
    JournalError,
    KernelError,
    TransportError,
    VimgError,
)

try:
    from vimgtools._blockdiff import diff_blocks, hash_blocks, zero_blocks
except ImportError as e:  # one engine, no silent fallback (STYLE.md §2)
    raise ImportError(
        "vimgtools: the native engine vimgtools._blockdiff is not built or cannot load "
        f"({e}). Build it with `pip install .` (needs a C compiler and libxxhash-dev)."
    ) from e

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy: `vimgtools.rekernel(disk, from_dir, **options)` without loading the guest layer (or
    # guestfs, which is only loaded when an appliance is launched) on `import vimgtools`.
    if name == "rekernel":
        import vimgtools.rekernel as module

        return module  # a callable module: vimgtools.rekernel(...) calls rekernel.rekernel(...)
    raise AttributeError(f"module 'vimgtools' has no attribute {name!r}")


__all__ = [
    "BootloaderError",
    "GuestError",
    "ImageError",
    "ImageRefused",
    "Interrupted",
    "InvalidInput",
    "JournalError",
    "KernelError",
    "TransportError",
    "VimgError",
    "diff_blocks",
    "hash_blocks",
    "rekernel",
    "zero_blocks",
]
