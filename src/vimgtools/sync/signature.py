"""Signature files: one 128-bit digest per block of an image, for a sync through another channel.

``write_signature(image, sigfile)`` stores the digests; ``delta`` compares an image with
them. A state file (``--state``) is a signature of SRC under another magic, with what the
replica looked like right after that sync.

Layout (little endian): a 4096-byte header (``SIG_HEADER`` + its XXH3-64), ``count``
digests of 16 bytes, then a trailer (``SIG_TRAILER``): the *content digest* and its own
checksum. The content digest is XXH3-64 over the XXH3-64 of each group of digests that
covers ``DIGEST_GROUP`` bytes of the image (the last group may be short): it identifies
the content a delta applies to. It depends on the block size (in the header) and on
``DIGEST_GROUP``, a constant of this format, not on how the image is read.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable
from pathlib import Path

from vimgtools.blocks import checksum64
from vimgtools.errors import InvalidInput, JournalError
from vimgtools.image import describe_os_error, fsync_dir, open_regular, start_writeback
from vimgtools.images import open_image
from vimgtools.sync.chunks import CHUNK_SIZE
from vimgtools.sync.digests import CHECKSUMS, DIGEST_BYTES, Digests, digest_stream, hole_digests
from vimgtools.sync.options import check_block_size, check_checksum
from vimgtools.sync.replica import NO_EXPECT, Expect

DIGEST_GROUP = 8 << 20  # image bytes per group of the content digest (the chunk size of version 1's writers)
SIG_MAGIC = b"VIMGSIGN"
STATE_MAGIC = b"VIMGSTAT"  # a signature of SRC, plus what DST looked like right after that sync
SIG_VERSION = 1
# magic, version, block size, digest name, key, image size, count, created,
# state files only: the replica's identity after the sync (dev, ino, size, mtime_ns, token)
SIG_HEADER = struct.Struct("<8sII16s32sQQQQQQQ96s")
SIG_TRAILER = struct.Struct("<8sQQ")  # b"SIGEND\0\0", content digest, checksum of the first two
SIG_END = b"SIGEND\0\0"
HEADER_SIZE = 4096
# Digests written, then started on their way to the disk while the scan goes on: the fsync at the
# end then waits for one page, not 16 MiB (4 GiB image, 4 KiB blocks: 17-52 ms -> 1-8 ms here).
WRITEBACK_BYTES = 4 << 20
_SUM = struct.Struct("<Q")

Progress = Callable[[int, int], None]


class SignatureInfo:
    """What ``write_signature`` wrote."""

    def __init__(
        self,
        path: Path,
        block_size: int,
        checksum: str,
        key: bytes,
        size: int,  # of the image it describes
        count: int,  # blocks
        digest: int,  # content digest (see module docstring)
    ) -> None:
        self.path, self.block_size, self.checksum, self.key = path, block_size, checksum, key
        self.size, self.count, self.digest = size, count, digest


class ContentDigest:
    """Accumulates the content digest of an image from its block digests, given in order in any pieces."""

    def __init__(self, block_size: int) -> None:
        self._group = max(1, DIGEST_GROUP // block_size) * DIGEST_BYTES  # bytes of digests per group
        self._sums = bytearray()
        self._pending = b""

    def add(self, digests: Digests) -> None:
        rows = memoryview(digests).cast("B")
        if self._pending:
            rows = memoryview(self._pending + bytes(rows))
        full = len(rows) // self._group * self._group
        for i in range(0, full, self._group):
            self._sums += _SUM.pack(checksum64(rows[i : i + self._group]))
        self._pending = bytes(rows[full:])

    @property
    def value(self) -> int:
        sums = bytes(self._sums)
        if self._pending:
            sums += _SUM.pack(checksum64(self._pending))
        step = 16 << 20  # checksum64's limit; an image past 16 TiB hashes the sums in pieces
        if len(sums) <= step:
            return checksum64(sums)
        return checksum64(
            b"".join(_SUM.pack(checksum64(sums[i : i + step])) for i in range(0, len(sums), step))
        )


class SignatureWriter:
    """Writes a signature (or state) file chunk by chunk, under a temporary name until ``finish``."""

    def __init__(
        self, path: Path, *, magic: bytes, block_size: int, checksum: str, key: bytes, size: int
    ) -> None:
        self.path, self.magic = path, magic
        self.block_size, self.checksum, self.key, self.size = block_size, checksum, key, size
        self.count = -(-size // block_size)
        self.tmp = path.with_name(path.name + ".tmp")
        self._acc = ContentDigest(block_size)
        self._next = 0
        self._flushed = HEADER_SIZE  # written back from here on (``add``)
        try:
            self._f = open(self.tmp, "wb")  # noqa: SIM115 (closed by finish/abort)
            self._f.write(bytes(HEADER_SIZE))  # the header is written last, with the expectation
        except OSError as e:
            raise JournalError(f"{path}: cannot write: {describe_os_error(e)}") from e

    def add(self, offset: int, digests: Digests) -> None:
        """The digests of the chunk at ``offset``; chunks come in order."""
        assert offset == self._next * CHUNK_SIZE, "chunks in order"
        self._f.write(memoryview(digests).cast("B"))
        self._acc.add(digests)
        self._next += 1
        pos = self._f.tell()
        if pos - self._flushed >= WRITEBACK_BYTES:
            self._f.flush()
            start_writeback(self._f.fileno(), self._flushed, pos - self._flushed)
            self._flushed = pos

    def finish(self, expect: Expect = NO_EXPECT) -> int:
        """Header, trailer, fsync, rename. Returns the content digest."""
        try:
            digest = self._acc.value
            trailer = SIG_END + _SUM.pack(digest)
            self._f.write(trailer + _SUM.pack(checksum64(trailer)))
            head = SIG_HEADER.pack(
                self.magic, SIG_VERSION, self.block_size, self.checksum.encode(), self.key, self.size,
                self.count, time.time_ns(), expect.dev, expect.ino, expect.size, expect.mtime_ns,
                expect.token.encode()[:96],
            )  # fmt: skip
            self._f.seek(0)
            self._f.write(head + _SUM.pack(checksum64(head)))
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            os.replace(self.tmp, self.path)
            fsync_dir(self.path.parent)
        except OSError as e:
            self.abort()
            raise JournalError(f"{self.path}: cannot write: {describe_os_error(e)}") from e
        return digest

    def abort(self) -> None:
        self._f.close()
        self.tmp.unlink(missing_ok=True)


def write_signature(
    image: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    block_size: int = 4096,
    checksum: str = "xxh128",
    progress: Progress | None = None,
    keep_cache: bool = False,
    dry_run: bool = False,
    fmt: str | None = None,
) -> SignatureInfo:
    """Write the block digests of ``image`` to ``out`` (atomically: a temporary name, then renamed).

    With ``dry_run`` the image is read and hashed and nothing is written. ``fmt``: the image's
    format (see ``vimgtools.formats``); the signature is of the guest's view.
    """
    check_block_size(block_size)
    check_checksum(checksum)
    key = os.urandom(32)
    with open_image(image, fmt=fmt, option="src_format") as img:
        w = None
        if not dry_run:
            w = SignatureWriter(
                Path(out), magic=SIG_MAGIC, block_size=block_size, checksum=checksum, key=key, size=img.size
            )
        acc = ContentDigest(block_size)
        try:
            for offset, length, digests, _, _ in digest_stream(
                img, 0, img.size, block_size, checksum, key, keep_cache=keep_cache
            ):
                if w is not None:
                    w.add(offset, digests)
                else:
                    acc.add(digests)
                if progress:
                    progress(offset + length, img.size)
        except BaseException:
            if w is not None:
                w.abort()
            raise
        digest = w.finish() if w is not None else acc.value
    return SignatureInfo(Path(out), block_size, checksum, key, img.size, -(-img.size // block_size), digest)


class Signature:
    """A signature file, read chunk by chunk; ``check_end()`` verifies everything that was read."""

    def __init__(self, path: str | os.PathLike[str], magic: bytes = SIG_MAGIC) -> None:
        self.path = Path(path)
        what = "signature" if magic == SIG_MAGIC else "state file"
        try:
            self._f = os.fdopen(open_regular(self.path, what), "rb")
        except OSError as e:
            raise InvalidInput(f"{self.path}: cannot read the {what}: {describe_os_error(e)}") from e
        raw = self._f.read(HEADER_SIZE)
        if len(raw) < SIG_HEADER.size + 8:
            raise JournalError(f"{self.path}: truncated signature header")
        fields = SIG_HEADER.unpack_from(raw)
        if fields[0] != magic:
            what = "signature" if magic == SIG_MAGIC else "state file"
            raise JournalError(f"{self.path}: not a vimgtools {what} (magic {fields[0]!r})")
        if fields[1] != SIG_VERSION:
            raise JournalError(
                f"{self.path}: signature version {fields[1]}, this vimgtools reads {SIG_VERSION}"
            )
        if checksum64(raw[: SIG_HEADER.size]) != _SUM.unpack_from(raw, SIG_HEADER.size)[0]:
            raise JournalError(f"{self.path}: signature header checksum mismatch (file damaged)")
        _, _, bs, name, key, size, count, _, e_dev, e_ino, e_size, e_mtime, e_token = fields
        self.expect = Expect(e_dev, e_ino, e_size, e_mtime, e_token.rstrip(b"\0").decode(errors="replace"))
        self.block_size, self.checksum, self.key = bs, name.rstrip(b"\0").decode(), key
        self.size, self.count = size, count
        if self.checksum not in CHECKSUMS or count != -(-size // bs):
            raise JournalError(f"{self.path}: inconsistent signature header")
        want = HEADER_SIZE + count * DIGEST_BYTES + SIG_TRAILER.size
        have = os.fstat(self._f.fileno()).st_size
        if have != want:
            raise JournalError(f"{self.path}: truncated or damaged signature ({have} bytes, expected {want})")
        self._acc = ContentDigest(bs)
        self._next_chunk = 0  # signature chunks are read (and checked) in order, each once

    def _chunk(self, index: int) -> bytes:
        per = CHUNK_SIZE // self.block_size
        assert index == self._next_chunk, "signature chunks are read in order"
        first = index * per
        n = max(0, min(per, self.count - first))
        self._f.seek(HEADER_SIZE + first * DIGEST_BYTES)
        raw = self._f.read(n * DIGEST_BYTES)
        if len(raw) != n * DIGEST_BYTES:
            raise JournalError(f"{self.path}: truncated signature")
        self._acc.add(raw)
        self._next_chunk += 1
        return raw

    def digests(self, offset: int, length: int) -> bytes:
        """The stored digests for the chunk at ``offset``, ``length`` bytes of it; past the image, zeros'."""
        bs = self.block_size
        n = -(-length // bs)
        rows = self._chunk(offset // CHUNK_SIZE)[: n * DIGEST_BYTES] if offset < self.size else b""
        if len(rows) == n * DIGEST_BYTES:
            return rows
        have = len(rows) // DIGEST_BYTES
        return rows + hole_digests(length - have * bs, bs, self.checksum, self.key)

    def verify(self) -> None:
        """Check every stored digest now, before any is relied on; then read from the start again."""
        self.finish_reading()
        self.check_end()
        self.rewind()

    def rewind(self) -> None:
        """Read from the first chunk again."""
        self._acc = ContentDigest(self.block_size)
        self._next_chunk = 0

    def finish_reading(self) -> None:
        """Read the chunks nobody asked for, so that ``check_end`` covers all of them."""
        while self._next_chunk * CHUNK_SIZE < self.size:
            self._chunk(self._next_chunk)

    def content_digest(self) -> int:
        self._f.seek(HEADER_SIZE + self.count * DIGEST_BYTES)
        magic, digest, stored = SIG_TRAILER.unpack(self._f.read(SIG_TRAILER.size))
        if magic != SIG_END or checksum64(SIG_END + _SUM.pack(digest)) != stored:
            raise JournalError(f"{self.path}: damaged signature trailer")
        return int(digest)

    def check_end(self) -> int:
        """After reading every chunk in order: the stored digests were intact. Returns the content digest."""
        digest = self.content_digest()
        if self._acc.value != digest:
            raise JournalError(f"{self.path}: signature digests damaged (content digest mismatch)")
        return digest

    def close(self) -> None:
        self._f.close()
