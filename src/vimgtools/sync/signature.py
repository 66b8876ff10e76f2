"""Signature and delta files: sync through another channel (a disk in the post, a one-way link).

``write_signature(image, sigfile)`` stores one 128-bit digest per block of an image.
``write_delta(src, delta, against=sigfile)`` stores the blocks of SRC that differ
from that signature. ``apply_delta(delta, dst)`` checks that DST holds exactly the
content the signature was made of, then applies the delta through the journal
(crash-atomic, like a sync).

Signature layout (little endian): a 4096-byte header (``SIG_HEADER`` + its
XXH3-64), ``count`` digests of 16 bytes, then a trailer (``SIG_TRAILER``): the
*content digest*, XXH3-64 over the XXH3-64 of each chunk's digests, and its own
checksum. A delta is a journal-format file (magic ``VIMGDLTA``) whose header holds
the digest algorithm, the key and the content digest of the signature it was made
against; it ends with a COMMIT record, so a truncated delta is recognised.
"""

from __future__ import annotations

import os
import secrets
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from vimgtools.blocks import checksum64
from vimgtools.errors import ImageRefused, InvalidInput, JournalError
from vimgtools.image import Image, describe_os_error, fsync_dir
from vimgtools.sync.digests import CHECKSUMS, DIGEST_BYTES, change_stream, digest_stream, hole_digests
from vimgtools.sync.journal import (
    DATA,
    DELTA_MAGIC,
    FLAG_SHRINK,
    Header,
    JournalWriter,
    iter_records,
    read_journal,
    remove_journal,
)
from vimgtools.sync.replica import NO_EXPECT, Expect, Replica, Source
from vimgtools.sync.scan import CHUNK_SIZE

SIG_MAGIC = b"VIMGSIGN"
STATE_MAGIC = b"VIMGSTAT"  # a signature of SRC, plus what DST looked like right after that sync
SIG_VERSION = 1
# magic, version, block size, digest name, key, image size, count, created,
# state files only: the replica's identity after the sync (dev, ino, size, mtime_ns, token)
SIG_HEADER = struct.Struct("<8sII16s32sQQQQQQQ96s")
SIG_TRAILER = struct.Struct("<8sQQ")  # b"SIGEND\0\0", content digest, checksum of the first two
SIG_END = b"SIGEND\0\0"
HEADER_SIZE = 4096
_SUM = struct.Struct("<Q")

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class SignatureInfo:
    path: Path
    block_size: int
    checksum: str
    key: bytes
    size: int  # of the image it describes
    count: int
    digest: int  # content digest (see module docstring)


class ChunkDigests:
    """Accumulates the content digest of an image chunk by chunk."""

    def __init__(self) -> None:
        self._sums = bytearray()

    def add(self, digests: npt.NDArray[np.uint64]) -> None:
        self._sums += _SUM.pack(checksum64(np.ascontiguousarray(digests).tobytes()))

    @property
    def value(self) -> int:
        step = 16 << 20  # checksum64's limit; an image past 16 TiB hashes the sums in pieces
        if len(self._sums) <= step:
            return checksum64(self._sums)
        return checksum64(
            b"".join(_SUM.pack(checksum64(self._sums[i : i + step])) for i in range(0, len(self._sums), step))
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
        self._acc = ChunkDigests()
        self._next = 0
        try:
            self._f = open(self.tmp, "wb")  # noqa: SIM115 (closed by finish/abort)
            self._f.write(bytes(HEADER_SIZE))  # the header is written last, with the expectation
        except OSError as e:
            raise JournalError(f"{path}: cannot write: {describe_os_error(e)}") from e

    def add(self, offset: int, digests: npt.NDArray[np.uint64]) -> None:
        """The digests of the chunk at ``offset``; chunks come in order."""
        assert offset == self._next * CHUNK_SIZE, "chunks in order"
        self._f.write(np.ascontiguousarray(digests).tobytes())
        self._acc.add(digests)
        self._next += 1

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
) -> SignatureInfo:
    """Write the block digests of ``image`` to ``out`` (atomically: a temporary name, then renamed)."""
    from vimgtools.sync import check_block_size

    check_block_size(block_size)
    if checksum not in CHECKSUMS:
        raise InvalidInput(f"--checksum {checksum!r}: known are {', '.join(CHECKSUMS)}")
    key = secrets.token_bytes(32)
    with Image(image) as img:
        w = SignatureWriter(
            Path(out), magic=SIG_MAGIC, block_size=block_size, checksum=checksum, key=key, size=img.size
        )
        try:
            for offset, length, digests, _, _ in digest_stream(
                img, 0, img.size, block_size, checksum, key, keep_cache=keep_cache
            ):
                w.add(offset, digests)
                if progress:
                    progress(offset + length, img.size)
        except BaseException:
            w.abort()
            raise
        digest = w.finish()
    return SignatureInfo(Path(out), block_size, checksum, key, img.size, w.count, digest)


class Signature:
    """A signature file, read chunk by chunk; ``check_end()`` verifies everything that was read."""

    def __init__(self, path: str | os.PathLike[str], magic: bytes = SIG_MAGIC) -> None:
        self.path = Path(path)
        try:
            self._f = open(self.path, "rb")  # noqa: SIM115 (closed by close())
        except OSError as e:
            raise InvalidInput(f"{self.path}: cannot read the signature: {describe_os_error(e)}") from e
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
        self._acc = ChunkDigests()
        self._next_chunk = 0  # signature chunks are read (and checked) in order, each once

    def _chunk(self, index: int) -> npt.NDArray[np.uint64]:
        per = CHUNK_SIZE // self.block_size
        assert index == self._next_chunk, "signature chunks are read in order"
        first = index * per
        n = max(0, min(per, self.count - first))
        self._f.seek(HEADER_SIZE + first * DIGEST_BYTES)
        raw = self._f.read(n * DIGEST_BYTES)
        if len(raw) != n * DIGEST_BYTES:
            raise JournalError(f"{self.path}: truncated signature")
        rows = np.frombuffer(raw, dtype=np.uint64).reshape(-1, 2)
        self._acc.add(rows)
        self._next_chunk += 1
        return rows

    def digests(self, offset: int, length: int) -> npt.NDArray[np.uint64]:
        """The stored digests for the chunk at ``offset``, ``length`` bytes of it; past the image, zeros'."""
        bs = self.block_size
        n = -(-length // bs)
        rows = self._chunk(offset // CHUNK_SIZE)[:n] if offset < self.size else np.empty((0, 2), np.uint64)
        if len(rows) == n:
            return rows
        return np.concatenate([rows, hole_digests(length - len(rows) * bs, bs, self.checksum, self.key)])

    def verify(self) -> None:
        """Check every stored digest now, before any is relied on; then read from the start again."""
        self.finish_reading()
        self.check_end()
        self.rewind()

    def rewind(self) -> None:
        """Read from the first chunk again."""
        self._acc = ChunkDigests()
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


@dataclass
class DeltaResult:
    blocks: int = 0
    changed: int = 0
    zero: int = 0
    bytes_read: int = 0
    delta_bytes: int = 0  # payload bytes in the delta
    bytes_written: int = 0
    journal_bytes: int = 0
    seconds: float = 0.0


def write_delta(
    src: str | os.PathLike[str],
    delta: str | os.PathLike[str],
    against: str | os.PathLike[str],
    *,
    block_size: int | None = None,
    progress: Progress | None = None,
    keep_cache: bool = False,
) -> DeltaResult:
    """Write the blocks of ``src`` that differ from the signature ``against`` into ``delta``.

    ``block_size``, when given, must be the signature's (a check, not a choice).
    """
    t0 = time.monotonic()
    sig = Signature(against)
    if block_size is not None and block_size != sig.block_size:
        sig.close()
        raise InvalidInput(
            f"{sig.path}: made with {sig.block_size}-byte blocks, but --block-size asks {block_size}"
        )
    res = DeltaResult()
    delta_path = Path(delta)
    try:
        bs = sig.block_size
        base_digest = sig.content_digest()
        with Image(src) as img:
            res.blocks = -(-img.size // bs)
            header = Header(
                DELTA_MAGIC,
                bs,
                sig.size,
                img.size,
                FLAG_SHRINK if img.size < sig.size else 0,
                img.size,
                digest_name=sig.checksum.encode(),
                digest_key=sig.key,
                base_digest=base_digest,
            )
            writer = JournalWriter(delta_path, header)
            try:
                for c in change_stream(
                    img, 0, img.size, bs, sig.checksum, sig.key, sig.digests, keep_cache=keep_cache
                ):
                    res.bytes_read += c.read
                    res.changed += c.changed
                    res.zero += c.zero
                    for off, n, payload in c.ranges:
                        if payload is None:
                            writer.zero(off, n)
                        else:
                            writer.data(off, payload)
                    if progress:
                        progress(c.offset + c.length, img.size)
                # Blocks of the base past our end are cut by the resize (FLAG_SHRINK): nothing to write.
                sig.finish_reading()
                sig.check_end()
                writer.commit()
                res.delta_bytes = writer.data_bytes
            except BaseException:
                writer.close()
                remove_journal(delta_path)
                raise
            writer.close()
    finally:
        sig.close()
    res.seconds = time.monotonic() - t0
    return res


def apply_delta(
    delta: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    allow_shrink: bool = True,
    force: bool = False,
    dry_run: bool = False,
    journal: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
) -> DeltaResult:
    """Apply ``delta`` to ``dst`` crash-atomically, after proving ``dst`` is the content it was made against.

    Raises:
        JournalError: the delta is truncated or damaged (nothing written, exit 1... reported as 2 by the CLI).
        ImageRefused: ``dst`` holds other content than the delta's base (nothing written, exit 2).
    """
    t0 = time.monotonic()
    delta_path = Path(delta)
    contents = read_journal(delta_path, DELTA_MAGIC)
    if not contents.committed:
        raise ImageRefused(
            f"{delta_path}: truncated or damaged delta (no intact end record); nothing written"
        )
    h = contents.header
    name = h.digest_name.decode(errors="replace")
    if name not in CHECKSUMS:
        raise ImageRefused(f"{delta_path}: unknown block digest {name!r}")
    dst_path = Path(dst)
    if not dst_path.exists():
        raise InvalidInput(f"{dst_path}: no such file or device (a delta applies to an existing image)")
    res = DeltaResult(blocks=-(-h.new_size // h.block_size))
    with Image(dst_path) as d:
        if d.size != h.old_size and not (d.is_block and d.size >= h.old_size):
            raise ImageRefused(
                f"{dst_path}: is {d.size} bytes; the delta was made against an image of {h.old_size} bytes"
            )
        acc = ChunkDigests()
        for offset, length, digests, _, read in digest_stream(
            d, 0, h.old_size, h.block_size, name, h.digest_key
        ):
            res.bytes_read += read
            acc.add(digests)
            if progress:
                progress(offset + length, h.old_size)
        if acc.value != h.base_digest:
            raise ImageRefused(
                f"{dst_path}: holds other content than the image the delta was made against; nothing written"
            )
    with Replica(
        dst_path,
        Source(h.new_size),
        block_size=h.block_size,
        dry_run=dry_run,
        allow_shrink=allow_shrink,
        force=force,
        journal=journal,
    ) as rep:
        try:
            for rec, payload in iter_records(contents):
                res.changed += -(-rec.length // h.block_size)
                if rec.kind == DATA and payload is not None:
                    res.delta_bytes += len(payload)
                    rep.data(rec.offset, payload)
                else:
                    res.zero += -(-rec.length // h.block_size)
                    rep.zero(rec.offset, rec.length)
            rep.finish()
        except BaseException:
            rep.abort(keep_for_resume=False)
            raise
        res.bytes_written, res.journal_bytes = rep.bytes_written, rep.journal_bytes
    res.seconds = time.monotonic() - t0
    return res
