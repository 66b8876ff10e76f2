"""Sync with an image on another host: push, pull, and the server behind ``ssh HOST python3 -m vimgtools.sync --server``.

Each end reads and hashes its own image; the receiver (the end with DST) streams the
digests of its blocks, the sender (the end with SRC) answers with the blocks that
differ (``sender``, ``receiver``). The receiver writes them through the same
``Replica`` as a local sync. With ``verify`` the far side then reads its image again
and sends its digests; the client compares them with its own. Conversation in ``wire``.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Generator, Iterable
from pathlib import Path
from typing import Any

from vimgtools.errors import ImageError, InvalidInput, TransportError, VimgError
from vimgtools.image import Image
from vimgtools.images import open_image
from vimgtools.sync.chunks import CHUNK_SIZE, Extents
from vimgtools.sync.digests import Changes, Hashed, Theirs, digest_stream, hash_ahead, hole_digests
from vimgtools.sync.options import SyncOptions, check_block_size
from vimgtools.sync.receiver import run_receiver, stream_digests
from vimgtools.sync.replica import Expect, Replica, Source, source_of
from vimgtools.sync.result import SyncResult, take_source
from vimgtools.sync.sender import (
    EARLY_LIMIT,
    ChannelSink,
    Session,
    changes_after,
    recv_digests,
    run_sender,
    scan_while_connecting,
)
from vimgtools.sync.ssh import Peer, split_remote
from vimgtools.sync.state import StateRun
from vimgtools.sync.wire import (
    DONE,
    HELLO,
    READY,
    RESULT,
    WIRE_MAGIC,
    WIRE_VERSION,
    Channel,
    recv_hello,
    send_error,
)

log = logging.getLogger("vimgtools.sync")

Progress = Callable[[int, int], None]


# -- the client ---------------------------------------------------------------
def hello(role: str, path: str, sess: Session, opts: SyncOptions, source: Source | None) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "magic": WIRE_MAGIC.decode(),
        "version": WIRE_VERSION,
        "role": role,
        "path": path,
        "block_size": sess.block_size,
        "chunk_size": CHUNK_SIZE,
        "checksum": sess.checksum,
        "key": sess.key.hex(),
        "options": opts.for_peer(),
    }
    if source is not None:
        msg["source"] = source_to_json(source)
    if sess.regions is not None:
        msg["regions"] = sess.regions.to_json()
    return msg


def source_to_json(s: Source) -> dict[str, Any]:
    return {
        "size": s.size, "identity": list(s.identity), "token": s.token, "mode": s.mode,
        "cluster_size": s.cluster_size,
    }  # fmt: skip


def source_from_json(obj: Any, peer: str) -> Source:
    try:
        size, ident = int(obj["size"]), tuple(int(x) for x in obj["identity"])
        if size < 0 or len(ident) != 3:
            raise ValueError
        cluster = int(obj.get("cluster_size", 0))
        return Source(size, (ident[0], ident[1], ident[2]), str(obj["token"]), int(obj["mode"]), cluster)
    except (KeyError, TypeError, ValueError) as e:
        raise TransportError(f"{peer}: malformed source description") from e


def new_session(opts: SyncOptions, start: int, end: int) -> Session:
    # A fresh random key each session: collisions cannot be prepared in advance.
    return Session(opts.block_size, opts.checksum, os.urandom(32), start, end, opts.workers)


def sync_remote(
    src: str,
    dst: str,
    opts: SyncOptions,
    *,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
) -> SyncResult:
    """Push (DST remote) or pull (SRC remote)."""
    host_s, path_s = split_remote(src)
    host_d, path_d = split_remote(dst)
    if host_s and host_d:
        raise InvalidInput(f"{src}, {dst}: both are remote; one side must be on this host")
    res = SyncResult(src, dst, opts.block_size, dry_run=opts.dry_run)
    if host_d:
        _push(Path(path_s), host_d, path_d, opts, res, progress, stop)
    else:
        assert host_s is not None
        if opts.state is not None:
            raise InvalidInput(
                "keeps the source's digests: it works when SRC is on this host", option="state"
            )
        _pull(host_s, path_s, Path(path_d), opts, res, progress, stop)
    return res


def _push(
    src: Path,
    host: str,
    path: str,
    opts: SyncOptions,
    res: SyncResult,
    progress: Progress | None,
    stop: threading.Event | None,
) -> None:
    """We send SRC; the far side receives into its replica."""
    with open_image(src, fmt=opts.src_format, option="src_format") as img:
        _push_from(img, host, path, opts, res, progress, stop, None)


# At most this many regions travel in HELLO (16 bytes of JSON or so each); more are merged.
MAX_REGIONS = 200_000


def push_from(
    img: Image,
    dst: str,
    opts: SyncOptions,
    *,
    progress: Progress | None,
    stop: threading.Event | None,
    regions: Extents | None = None,
) -> SyncResult:
    """Push an open source image into ``[USER@]HOST:PATH`` (replicate's disks over ssh); with
    ``regions`` (a dirty bitmap's) only those extents are compared and sent, at both ends."""
    t0 = time.monotonic()
    host, path = split_remote(dst)
    if host is None:
        raise InvalidInput(f"{dst}: not [USER@]HOST:PATH")
    res = SyncResult(str(img.path), dst, opts.block_size, dry_run=opts.dry_run)
    if regions is not None and len(regions) > MAX_REGIONS:
        regions = regions.coarsened(MAX_REGIONS)
    _push_from(img, host, path, opts, res, progress, stop, regions)
    res.seconds = time.monotonic() - t0
    return res


def _push_from(
    img: Image,
    host: str,
    path: str,
    opts: SyncOptions,
    res: SyncResult,
    progress: Progress | None,
    stop: threading.Event | None,
    regions: Extents | None,
) -> None:
    keep_cache = opts.keep_cache
    take_source(res, img)
    sess = new_session(opts, 0, img.size)
    sess.regions = regions
    st = StateRun(opts.state, opts.block_size, opts.checksum, img.size) if opts.state else None
    if st is not None:
        sess.checksum, sess.key = st.checksum, st.key
    msg = hello("receiver", path, sess, opts, source_of(img))
    msg["state_expect"] = st.old.expect.to_json() if st and st.old else None
    t_connect = time.monotonic()
    peer = Peer.start(host, opts.rsh, opts.remote_python, opts.timeout)
    early: tuple[list[Changes], Generator[Changes, None, None]] | None = None
    ahead: list[Hashed] = []
    try:
        ch = peer.channel
        ch.send_json(HELLO, msg)

        def waiting() -> bool:  # for the far side's first answer
            return ch.readable() or (stop is not None and stop.is_set())

        if st is not None and st.old is not None:  # changes known without the far side
            early = scan_while_connecting(img, sess, st.old, waiting, keep_cache)
        else:  # our digests, at least
            ahead = hash_ahead(
                img, 0, sess.end, sess.block_size, sess.checksum, sess.key,
                stop_when=waiting, limit=EARLY_LIMIT, keep_cache=keep_cache, workers=sess.workers,
                regions=regions,
            )  # fmt: skip
        _, ready = ch.recv_json(READY)
        res.seconds_connect = time.monotonic() - t_connect
        sess.start = _resume_point(ready, sess, host)
        stored = st.trusted(ready.get("state_ok") is True) if st is not None else None
        theirs: Theirs = stored or (lambda o, n: recv_digests(ch, o, n, sess.block_size))
        changes: Iterable[Changes] | None = None
        if early is not None and stored is not None and sess.start == 0:
            changes = itertools.chain(*early)
        elif early is not None and st is not None and st.old is not None:  # a replica changed since,
            early[1].close()  # or a resumed run: the early scan is of no use
            st.old.rewind()
        elif ahead and sess.start == 0:
            changes = changes_after(img, sess, ahead, theirs, keep_cache)
        pre = st.prepass(img, sess, keep_cache, stored is not None) if st else 0
        fig = run_sender(
            img, sess, theirs, ChannelSink(ch),
            progress=progress, stop=stop, keep_cache=keep_cache, dry_run=opts.dry_run,
            record=st.writer.add if st else None, changes=changes,
        )  # fmt: skip
        fig.bytes_read += pre
        ch.send_json(DONE, {"bytes_read": fig.bytes_read})
        _, result = ch.recv_json(RESULT)
        if st is not None:
            after = Expect.from_json(result.get("dst_after"))
            if after is None or opts.dry_run:
                st.writer.abort()
            else:
                st.writer.finish(after)
            res.state = st.note
        if opts.verify and not opts.dry_run:
            res.verified = _compare_with_far_side(ch, img, sess, keep_cache)
    except BaseException as e:
        if st is not None:
            st.writer.abort()
        if isinstance(e, TransportError):
            raise peer.explain(e) from e
        raise
    finally:
        if early is not None:
            early[1].close()  # its threads end before SRC is closed
        peer.close()
        if st is not None:
            st.close()
    res.changed, res.zero = fig.changed, fig.zero
    res.bytes_read = fig.bytes_read + _int(result, "bytes_read")
    res.take_replica(result)
    res.bytes_sent, res.bytes_received = ch.counters.sent, ch.counters.received
    _check_verified(res)


def _pull(
    host: str,
    path: str,
    dst: Path,
    opts: SyncOptions,
    res: SyncResult,
    progress: Progress | None,
    stop: threading.Event | None,
) -> None:
    """The far side sends its SRC; we receive into DST."""
    sess = new_session(opts, 0, 0)
    t_connect = time.monotonic()
    peer = Peer.start(host, opts.rsh, opts.remote_python, opts.timeout)
    try:
        ch = peer.channel
        ch.send_json(HELLO, hello("sender", path, sess, opts, None))
        _, ready = ch.recv_json(READY)
        res.seconds_connect = time.monotonic() - t_connect
        source = source_from_json(ready.get("source"), host)
        res.size, res.blocks = source.size, -(-source.size // opts.block_size)
        res.src_format = str(ready.get("format", "raw"))
        res.src_chain = [c for c in ready.get("chain", []) if isinstance(c, dict)]
        sess.end = source.size
        with Replica.for_sync(dst, source, opts) as rep:
            sess.start = rep.resume_from
            ch.send_json(READY, {"resume_from": rep.resume_from})
            with rep.receiving(opts.undo):
                fig, done = run_receiver(rep, ch, sess, keep_cache=opts.keep_cache, stop=stop)
            ch.send_json(RESULT, {"bytes_written": rep.bytes_written})
            res.take_replica(rep.figures())
        if opts.verify and not opts.dry_run:
            with open_image(dst, fmt=opts.dst_format, option="dst_format") as d:
                res.verified = _compare_with_far_side(ch, d, sess, opts.keep_cache)
    except TransportError as e:
        raise peer.explain(e) from e
    finally:
        peer.close()
    res.changed, res.zero = fig.changed, fig.zero
    res.bytes_read = fig.bytes_read + _int(done, "bytes_read")
    res.bytes_sent, res.bytes_received = ch.counters.sent, ch.counters.received
    _check_verified(res)


def _compare_with_far_side(ch: Channel, img: Image, sess: Session, keep_cache: bool) -> bool:
    """--verify: our digests of ``img`` against the ones the far side sends of its image, chunk by chunk."""
    whole = sess.whole()
    img.drop_cache(0, 0)  # read back what reached the disk, not cached writes
    same = True
    for offset, length, mine, _, _ in digest_stream(
        img, 0, whole.end, whole.block_size, whole.checksum, whole.key,
        keep_cache=keep_cache, workers=whole.workers,
    ):  # fmt: skip
        theirs = recv_digests(
            ch, offset, length, whole.block_size
        )  # every chunk is read, even after a mismatch
        other = (
            hole_digests(length, whole.block_size, whole.checksum, whole.key) if theirs is None else theirs
        )
        same = same and bytes(mine) == bytes(other)
    return same


def _check_verified(res: SyncResult) -> None:
    if res.verified is False:
        raise ImageError(f"{res.dst}: verification failed: it differs from {res.src}")


def _int(obj: dict[str, Any], key: str) -> int:
    v = obj.get(key, 0)
    return int(v) if isinstance(v, int) and v >= 0 else 0


def _resume_point(ready: dict[str, Any], sess: Session, peer: str) -> int:
    start = ready.get("resume_from", 0)
    if not isinstance(start, int) or start < 0 or start > sess.end or start % CHUNK_SIZE:
        raise TransportError(f"{peer}: impossible resume position {start!r}")
    return start


# -- the server ---------------------------------------------------------------
def serve(rfd: int = 0, wfd: int = 1, timeout: float = 300.0) -> int:
    """The far side: speak the protocol on stdin/stdout. Returns the exit code."""
    ch = Channel(rfd, wfd, peer="client", timeout=timeout)
    try:
        msg = recv_hello(ch)
        sess, opts = _session_from(msg)
        path = Path(str(msg.get("path", "")))
        if msg.get("role") == "receiver":
            _serve_receiver(ch, sess, opts, path, msg)
        elif msg.get("role") == "sender":
            _serve_sender(ch, sess, opts, path)
        else:
            raise TransportError(f"unknown role {msg.get('role')!r}")
        return 0
    except VimgError as e:
        log.debug("server failed", exc_info=True)
        send_error(ch, e)
        return e.exit_code
    except Exception as e:
        log.exception("server failed")
        send_error(ch, e)
        return 1


def _serve_receiver(ch: Channel, sess: Session, opts: SyncOptions, path: Path, msg: dict[str, Any]) -> None:
    source = source_from_json(msg.get("source"), "client")
    sess.end = source.size
    with Replica.for_sync(path, source, opts) as rep:
        sess.start = rep.resume_from
        state_ok = rep.trusts(Expect.from_json(msg.get("state_expect")))
        ch.send_json(READY, {"resume_from": rep.resume_from, "state_ok": state_ok})
        with rep.receiving(opts.undo):
            fig, _ = run_receiver(rep, ch, sess, keep_cache=opts.keep_cache, send_digests=not state_ok)
        after = rep.expect_after()
        result: dict[str, Any] = {
            **rep.figures(),
            "bytes_read": fig.bytes_read,
            "dst_after": after.to_json() if after else None,
        }
        ch.send_json(RESULT, result)
    if opts.verify and not opts.dry_run:
        _send_for_verify(ch, path, opts.dst_format, sess, opts.keep_cache)


def _serve_sender(ch: Channel, sess: Session, opts: SyncOptions, path: Path) -> None:
    with open_image(path, fmt=opts.src_format, option="src_format") as img:
        ready = {"source": source_to_json(source_of(img)), "format": img.format, "chain": img.chain}
        ch.send_json(READY, ready)
        sess.end = img.size
        _, start = ch.recv_json(READY)
        sess.start = _resume_point(start, sess, "client")
        fig = run_sender(
            img, sess, lambda o, n: recv_digests(ch, o, n, sess.block_size), ChannelSink(ch),
            keep_cache=opts.keep_cache, dry_run=opts.dry_run,
        )  # fmt: skip
        ch.send_json(DONE, {"bytes_read": fig.bytes_read})
        ch.recv_json(RESULT)
    if opts.verify and not opts.dry_run:
        _send_for_verify(ch, path, opts.src_format, sess, opts.keep_cache)


def _send_for_verify(ch: Channel, path: Path, fmt: str | None, sess: Session, keep_cache: bool) -> None:
    """--verify: read our image again (from the disk, not our cached writes) and send its digests."""
    whole = sess.whole()
    with open_image(path, fmt=fmt) as img:
        img.drop_cache(0, 0)
        stream_digests(ch, img, whole, keep_cache=keep_cache, size=min(img.size, whole.end))


def _session_from(msg: dict[str, Any]) -> tuple[Session, SyncOptions]:
    bs = msg.get("block_size")
    if not isinstance(bs, int):
        raise TransportError("HELLO without a block size")
    check_block_size(bs)
    if msg.get("chunk_size") != CHUNK_SIZE:
        raise TransportError(f"chunk size {msg.get('chunk_size')!r} differs from ours ({CHUNK_SIZE})")
    checksum = msg.get("checksum")
    if not isinstance(checksum, str):
        raise TransportError(f"unknown checksum {checksum!r}")
    try:
        key = bytes.fromhex(str(msg.get("key")))
    except ValueError as e:
        raise TransportError("malformed session key") from e
    if len(key) != 32:
        raise TransportError("malformed session key")
    try:
        opts = SyncOptions.from_peer(msg.get("options"), block_size=bs, checksum=checksum)
    except (InvalidInput, TypeError) as e:
        raise TransportError(f"options refused: {e}") from e
    try:
        regions = None if msg.get("regions") is None else Extents.from_json(msg["regions"])
    except ValueError as e:
        raise TransportError(str(e)) from e
    return Session(bs, checksum, key, 0, 0, opts.workers, regions), opts
