"""The sending end (the one with SRC): hash SRC, compare with the other side's digests, send what differs.

The other side's digests come from the wire (the receiver streams them), from a state
file (``--state``), or from the replica itself on this host; the changes go to a
``Sink``: the wire, or a ``Replica`` here. While ssh connects, a push already works:
``scan_while_connecting`` (with a state file) and ``digests.hash_ahead`` (without).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import TYPE_CHECKING, Protocol

from vimgtools.errors import Interrupted, TransportError
from vimgtools.image import Image
from vimgtools.sync.chunks import CHUNK_SIZE, Extents, fresh_buffer
from vimgtools.sync.digests import DIGEST_BYTES, Changes, Digests, Hashed, Theirs, change_stream, changes_of
from vimgtools.sync.wire import CHUNK_END, DATA, DIGESTS, HOLES, OFFSET, RANGE, ZERO, Channel

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from vimgtools.sync.signature import Signature


class Session:
    """What both ends agreed on in HELLO/READY (``start``, ``end``, ``regions`` settle as they go on)."""

    def __init__(
        self,
        block_size: int,
        checksum: str,
        key: bytes,
        start: int,
        end: int,
        workers: int = 2,  # reader threads on this end
        regions: Extents | None = None,  # the only extents compared (a dirty bitmap's); None: all
    ) -> None:
        self.block_size, self.checksum, self.key = block_size, checksum, key
        self.start, self.end, self.workers, self.regions = start, end, workers, regions

    def whole(self) -> Session:
        """The same session over the whole image."""
        return Session(self.block_size, self.checksum, self.key, 0, self.end, self.workers)


class Figures:
    """A sending or receiving end's counts."""

    def __init__(self) -> None:
        self.bytes_read = 0
        self.changed = 0
        self.zero = 0


class Sink(Protocol):
    """Where a sender's changes go: the wire, or a replica on this host."""

    def data(self, offset: int, payload: Buffer) -> None: ...
    def zero(self, offset: int, length: int) -> None: ...
    def end_chunk(self, position: int) -> None: ...


class ChannelSink:
    def __init__(self, ch: Channel) -> None:
        self.ch = ch

    def data(self, offset: int, payload: Buffer) -> None:
        self.ch.send(DATA, OFFSET.pack(offset), payload)

    def zero(self, offset: int, length: int) -> None:
        self.ch.send(ZERO, RANGE.pack(offset, length))

    def end_chunk(self, position: int) -> None:
        self.ch.send(CHUNK_END, OFFSET.pack(position))


def run_sender(
    img: Image,
    sess: Session,
    theirs: Callable[[int, int], Digests | None],
    sink: Sink,
    *,
    progress: Callable[[int, int], None] | None = None,
    stop: threading.Event | None = None,
    keep_cache: bool = False,
    dry_run: bool = False,
    record: Callable[[int, Digests], None] | None = None,
    changes: Iterable[Changes] | None = None,
) -> Figures:
    """Read and hash SRC chunk by chunk, compare with the other side's digests, hand over what differs.

    Args:
        theirs: digests of DST for (offset, length), None where DST is a hole there
            (from the wire, or from a state file).
        sink: receives the changed ranges.
        record: gets every chunk's digests of SRC (to write a new state file).
        changes: the compared chunks, if the caller has started on them (``theirs`` is then unused).
    """
    fig = Figures()
    if changes is None:
        changes = change_stream(
            img, sess.start, sess.end, sess.block_size, sess.checksum, sess.key, theirs,
            keep_cache=keep_cache, workers=sess.workers, regions=sess.regions,
        )  # fmt: skip
    for c in changes:
        offset, length = c.offset, c.length
        fig.bytes_read += c.read
        fig.changed += c.changed
        fig.zero += c.zero
        if record is not None:
            record(offset, c.digests)
        for off, n, payload in [] if dry_run else c.ranges:
            if payload is None:
                sink.zero(off, n)
            else:
                sink.data(off, payload)
        sink.end_chunk(offset + length)
        if progress:
            progress(offset + length, sess.end)
        if stop is not None and stop.is_set() and offset + length < sess.end:
            raise Interrupted(
                f"stopped at {offset + length} of {sess.end} bytes; run the same command again to resume"
            )
    return fig


def recv_digests(ch: Channel, offset: int, length: int, bs: int) -> memoryview | None:
    ftype, payload = ch.recv(DIGESTS, HOLES)
    if ftype == HOLES:
        if len(payload) != RANGE.size or RANGE.unpack(payload) != (offset, length):
            raise TransportError(f"{ch.peer}: HOLES for the wrong range")
        return None
    (got,) = OFFSET.unpack_from(payload)
    want = -(-length // bs) * DIGEST_BYTES
    if got != offset or len(payload) - OFFSET.size != want:
        raise TransportError(f"{ch.peer}: digests for the wrong chunk (offset {got}, {len(payload)} bytes)")
    return memoryview(payload)[OFFSET.size :]


EARLY_LIMIT = 128 << 20  # bytes (changed bytes, or digests) found and held while the far side starts


def scan_while_connecting(
    img: Image, sess: Session, stored: Signature, stop_when: Callable[[], bool], keep_cache: bool
) -> tuple[list[Changes], Generator[Changes, None, None]]:
    """With a state file SRC's changes are known without the far side: find them while ssh connects.

    Returns the chunks found before the far side answered (at most ``EARLY_LIMIT`` changed bytes
    held) and the stream that goes on from there. Usable only if the far side trusts the state
    and starts at 0; otherwise the caller closes the stream and rewinds ``stored``.
    """
    stream = change_stream(
        img, 0, sess.end, sess.block_size, sess.checksum, sess.key, stored.digests,
        keep_cache=keep_cache, workers=sess.workers,
    )  # fmt: skip
    found: list[Changes] = []
    held = 0
    while held < EARLY_LIMIT and not stop_when():
        c = next(stream, None)
        if c is None:
            break
        found.append(c.detach())
        held += sum(n for _, n, payload in c.ranges if payload is not None)
    return found, stream


def changes_after(
    img: Image, sess: Session, ahead: list[Hashed], theirs: Theirs, keep_cache: bool
) -> Iterator[Changes]:
    """The chunks hashed while connecting (their changed blocks read again), then the rest as usual."""
    out = fresh_buffer(CHUNK_SIZE)
    for h in ahead:
        yield changes_of(img, h, theirs(h.offset, h.length), sess.block_size, out, keep_cache)
    start = ahead[-1].offset + ahead[-1].length
    yield from change_stream(
        img, start, sess.end, sess.block_size, sess.checksum, sess.key, theirs,
        keep_cache=keep_cache, workers=sess.workers, regions=sess.regions,
    )  # fmt: skip
