"""The block engine put to work: checksums of records and per-chunk change runs.

Nothing here needs numpy: the sync layer works on plain buffers (digests 16 bytes a block,
zero flags one byte a block) and lists of runs; numpy is loaded only by the engine's
array-returning functions, when a caller uses them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vimgtools._blockdiff import (
    MAX_BLOCK_SIZE,
    diff_blocks,
    diff_runs,
    digest_blocks,
    digest_into,
    digest_runs,
    hash_blocks,
    zero_blocks,
)
from vimgtools._blockdiff import checksum64 as _checksum64

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = [
    "checksum64",
    "coalesce_runs",
    "diff_blocks",
    "diff_runs",
    "digest_blocks",
    "digest_into",
    "digest_runs",
    "hash_blocks",
    "zero_blocks",
]


def checksum64(data: Buffer) -> int:
    """XXH3-64 of ``data`` (at most 16 MiB): the checksum of our file headers and records."""
    view = memoryview(data)
    if view.nbytes > MAX_BLOCK_SIZE:
        raise ValueError(f"checksum64 takes at most {MAX_BLOCK_SIZE} bytes, got {view.nbytes}")
    return int(_checksum64(view))


Run = tuple[int, int, bool]  # (first block, end block (exclusive), all zero)


def coalesce_runs(indices: Buffer, zero: Buffer) -> list[Run]:
    """Coalesce sorted changed block indices into runs of the same kind (data or zero).

    ``zero[i]`` tells whether block ``indices[i]`` is all zeros in the new content. Any
    sequences (numpy arrays, lists); not on a hot path (the engine's ``diff_runs`` and
    ``digest_runs`` give runs directly).
    """
    runs: list[Run] = []
    for i, z in zip(list(indices), list(zero), strict=True):  # type: ignore[call-overload]
        i, z = int(i), bool(z)
        if runs and runs[-1][1] == i and runs[-1][2] == z:
            runs[-1] = (runs[-1][0], i + 1, z)
        else:
            runs.append((i, i + 1, z))
    return runs
