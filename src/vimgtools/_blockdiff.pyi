"""Type stub for the native block engine (see _blockdiff.pyx)."""

from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from typing_extensions import Buffer

MIN_BLOCK_SIZE: int
MAX_BLOCK_SIZE: int
ALGORITHMS: tuple[str, ...]
XXH3_DISPATCH: bool  # the system libxxhash's run-time SIMD choice (SSE2/AVX2/AVX-512) is in use

def hash_blocks(
    buf: Buffer | npt.NDArray[Any],
    block_size: int,
    algorithm: Literal["xxh128", "xxh64"] | str = "xxh128",
    seed: int = 0,
) -> npt.NDArray[np.uint64]: ...
def diff_blocks(
    a: Buffer | npt.NDArray[Any], b: Buffer | npt.NDArray[Any], block_size: int
) -> npt.NDArray[np.int64]: ...
def zero_blocks(buf: Buffer | npt.NDArray[Any], block_size: int) -> npt.NDArray[np.bool_]: ...
def digest_blocks(
    buf: Buffer | npt.NDArray[Any],
    block_size: int,
    seed: int,
    digests: npt.NDArray[np.uint64],
    zero: npt.NDArray[np.bool_],
    against: npt.NDArray[np.uint64] | None = None,
) -> npt.NDArray[np.int64]: ...

# The sync layer's functions: plain buffers and lists of runs, no numpy.
def checksum64(buf: Buffer | npt.NDArray[Any]) -> int: ...
def digest_into(
    buf: Buffer | npt.NDArray[Any],
    block_size: int,
    seed: int,
    digests: Buffer,
    zero: Buffer,
    against: Buffer | None = None,
) -> list[tuple[int, int]]: ...
def diff_runs(
    a: Buffer | npt.NDArray[Any], b: Buffer | npt.NDArray[Any], block_size: int
) -> list[tuple[int, int, bool]]: ...
def digest_runs(mine: Buffer, theirs: Buffer, zero: Buffer) -> list[tuple[int, int, bool]]: ...
