"""vimgtools: replicate VM disk images by changed blocks, swap a guest's kernel offline.

Public names are re-exported here; this module never imports guestfs.
"""

from __future__ import annotations

from typing import Any

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
