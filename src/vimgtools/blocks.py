"""The block engine put to work: checksums of records and per-chunk change runs."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from vimgtools._blockdiff import MAX_BLOCK_SIZE, diff_blocks, digest_blocks, hash_blocks, zero_blocks

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["checksum64", "coalesce_runs", "diff_blocks", "digest_blocks", "hash_blocks", "zero_blocks"]

_EMPTY_XXH3_64 = 0x2D06800538D394C2  # XXH3-64 of b"" with seed 0


def checksum64(data: Buffer) -> int:
    """XXH3-64 of ``data`` (at most 16 MiB): the checksum of our file headers and records."""
    view = memoryview(data).cast("B")
    if len(view) == 0:
        return _EMPTY_XXH3_64
    if len(view) > MAX_BLOCK_SIZE:
        raise ValueError(f"checksum64 takes at most {MAX_BLOCK_SIZE} bytes, got {len(view)}")
    return int(hash_blocks(view, MAX_BLOCK_SIZE, "xxh64")[0])


Run = tuple[int, int, bool]  # (first block, end block (exclusive), all zero)


def coalesce_runs(indices: npt.NDArray[np.int64], zero: npt.NDArray[np.bool_]) -> list[Run]:
    """Coalesce sorted changed block indices into runs of the same kind (data or zero).

    ``zero[i]`` tells whether block ``indices[i]`` is all zeros in the new content.
    One Python tuple per run, never one per block.
    """
    if len(indices) == 0:
        return []
    breaks = np.flatnonzero((np.diff(indices) != 1) | (zero[1:] != zero[:-1])) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(indices)]))
    first = indices[starts]
    last = indices[ends - 1] + 1
    kinds = zero[starts]
    return list(zip(first.tolist(), last.tolist(), kinds.tolist(), strict=True))
