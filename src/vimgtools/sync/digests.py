"""Block digests for comparing images that are not side by side (remote sync, signatures, state).

128 bits a block: XXH3-128 seeded from a per-session random key (fast; collisions
cannot be prepared without the key), or keyed BLAKE2b (for replicas of guests
whose owners are not trusted). Holes are never hashed: their digests come from
one block of zeros.
"""

from __future__ import annotations

import hashlib

import numpy as np
import numpy.typing as npt

from vimgtools.blocks import hash_blocks, zero_blocks
from vimgtools.image import Image
from vimgtools.sync.scan import CHUNK_SIZE, read_chunk

CHECKSUMS = ("xxh128", "blake2b")
DIGEST_BYTES = 16
_ZEROS = memoryview(bytes(CHUNK_SIZE))


def block_digests(view: memoryview, bs: int, checksum: str, key: bytes) -> npt.NDArray[np.uint64]:
    """One 128-bit digest per block: (n, 2) uint64. XXH3-128 seeded, or keyed BLAKE2b."""
    if checksum == "xxh128":
        return hash_blocks(view, bs, "xxh128", int.from_bytes(key[:8], "little"))
    out = bytearray()
    for i in range(0, len(view), bs):  # hashlib releases the GIL on each block
        out += hashlib.blake2b(view[i : i + bs], digest_size=DIGEST_BYTES, key=key).digest()
    return np.frombuffer(bytes(out), dtype=np.uint64).reshape(-1, 2)


def hole_digests(length: int, bs: int, checksum: str, key: bytes) -> npt.NDArray[np.uint64]:
    """Digests of ``length`` zero bytes, computed from one block instead of hashing them all."""
    n = -(-length // bs)
    full = block_digests(_ZEROS[:bs], bs, checksum, key)[0]
    out = np.tile(full, (n, 1))
    if length % bs:
        out[-1] = block_digests(_ZEROS[: length % bs], bs, checksum, key)[0]
    return out


def chunk_digests(
    img: Image,
    offset: int,
    length: int,
    bs: int,
    checksum: str,
    key: bytes,
    buf: memoryview,
    keep_cache: bool,
) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.bool_] | None, int]:
    """Digests of one chunk of ``img`` (holes are not read), its zero-block mask (None for a hole), bytes read."""
    inside = max(0, min(length, img.size - offset))
    if inside == 0 or img.is_hole(offset, inside):
        return hole_digests(length, bs, checksum, key), None, 0
    view = buf[:length]
    read = read_chunk(img, offset, view[:inside], keep_cache)
    if inside < length:
        view[inside:] = bytes(length - inside)
    return block_digests(view, bs, checksum, key), zero_blocks(view, bs), read
