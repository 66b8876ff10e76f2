"""The receiving end (the one with DST): stream DST's digests, take the sender's changes into a ``Replica``.

Every offset and length from the sender is checked against the chunk being sent: a
hostile or broken peer cannot make us write outside the image.
"""

from __future__ import annotations

import threading
from typing import Any

from vimgtools.errors import Interrupted, TransportError, VimgError
from vimgtools.image import Image
from vimgtools.sync.chunks import CHUNK_SIZE
from vimgtools.sync.digests import digest_stream
from vimgtools.sync.replica import Replica
from vimgtools.sync.sender import Figures, Session
from vimgtools.sync.wire import (
    CHUNK_END,
    DATA,
    DIGESTS,
    DONE,
    HOLES,
    OFFSET,
    RANGE,
    ZERO,
    Channel,
    loads_object,
    send_error,
)  # fmt: skip


def stream_digests(
    ch: Channel,
    img: Image | None,
    sess: Session,
    *,
    keep_cache: bool,
    size: int | None = None,
    figures: Figures | None = None,
) -> None:
    """Send the digests of each chunk of [start, end) of ``img`` (None: all holes), in order.

    What a receiver streams to its sender, and what the far side sends for ``--verify``.
    """
    if img is None:  # a new replica: all holes
        for offset in range(sess.start, sess.end, CHUNK_SIZE):
            ch.send(HOLES, RANGE.pack(offset, min(CHUNK_SIZE, sess.end - offset)))
        return
    for offset, length, mine, zero, read in digest_stream(
        img, sess.start, sess.end, sess.block_size, sess.checksum, sess.key,
        keep_cache=keep_cache, size=size, workers=sess.workers, regions=sess.regions,
    ):  # fmt: skip
        if figures is not None:
            figures.bytes_read += read
        if zero is None:
            ch.send(HOLES, RANGE.pack(offset, length))
        else:
            ch.send(DIGESTS, OFFSET.pack(offset), mine)


def run_receiver(
    rep: Replica,
    ch: Channel,
    sess: Session,
    *,
    keep_cache: bool = False,
    stop: threading.Event | None = None,
    send_digests: bool = True,
) -> tuple[Figures, dict[str, Any]]:
    """Stream DST's digests to the sender while taking its changes into the replica.

    Every offset and length from the sender is checked against the chunk being sent:
    a hostile or broken peer cannot make us write outside the image.
    """
    bs, fig = sess.block_size, Figures()
    img = rep.image
    failure: list[BaseException] = []
    if img is not None and not keep_cache:
        img.no_readahead()

    def digests() -> None:
        try:
            stream_digests(ch, img, sess, keep_cache=keep_cache, size=rep.dst_size, figures=fig)
        except BaseException as e:  # reported by the main loop, which the sender's end wakes up
            failure.append(e)
            send_error(ch, e)

    t = threading.Thread(target=digests, name="vimg-digests", daemon=True)
    if send_digests:  # with a trusted --state the sender needs none of ours
        t.start()
    chunk = sess.start
    while True:
        try:
            ftype, payload = ch.recv(DATA, ZERO, CHUNK_END, DONE)
        except VimgError:
            if failure:  # the sender stopped because our digests did: that is the cause
                raise failure[0] from None
            raise
        if ftype == DONE:
            if chunk < sess.end:
                raise TransportError(f"{ch.peer}: DONE before the end ({chunk} of {sess.end} bytes)")
            done = loads_object(payload, f"{ch.peer}: malformed DONE message")
            break
        chunk_end = min(chunk + CHUNK_SIZE, sess.end)
        if chunk >= sess.end:
            raise TransportError(f"{ch.peer}: data past the end of the image")
        if ftype == CHUNK_END:
            if len(payload) != OFFSET.size or OFFSET.unpack(payload)[0] != chunk_end:
                raise TransportError(f"{ch.peer}: chunk end out of order")
            rep.end_chunk(chunk_end)
            chunk = chunk_end
            if stop is not None and stop.is_set() and chunk < sess.end:
                raise Interrupted(
                    f"{rep.path}: unchanged; stopped at {chunk} of {sess.end} bytes; "
                    "run the same command again to resume"
                )
            continue
        if ftype == DATA:
            if len(payload) <= OFFSET.size:
                raise TransportError(f"{ch.peer}: empty DATA frame")
            (off,) = OFFSET.unpack_from(payload)
            n = len(payload) - OFFSET.size
        else:
            if len(payload) != RANGE.size:
                raise TransportError(f"{ch.peer}: malformed ZERO frame")
            off, n = RANGE.unpack(payload)
        if off % bs or not (chunk <= off and n > 0 and off + n <= chunk_end):
            raise TransportError(
                f"{ch.peer}: refused a write of {n} bytes at offset {off}, outside the chunk "
                f"[{chunk}, {chunk_end}) being sent"
            )
        fig.changed += -(-n // bs)
        if ftype == DATA:
            rep.data(off, payload[OFFSET.size :])
        else:
            fig.zero += -(-n // bs)
            rep.zero(off, n)
    if send_digests:
        t.join()
    if failure:
        raise failure[0]
    return fig, done
