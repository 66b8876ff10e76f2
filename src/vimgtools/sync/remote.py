"""Sync with an image on another host: ``ssh HOST python3 -m vimgtools.sync --server``.

Each end reads and hashes its own image; the receiver (the end with DST) streams
the digests of its blocks, the sender (the end with SRC) answers with the blocks
that differ. The receiver writes them through the same ``Replica`` as a local sync
(journal, resume, hole punching, size rules). Paths travel inside the protocol,
never on a shell command line; the host is one argv element for ssh.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import re
import secrets
import shlex
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt

from vimgtools.errors import Interrupted, InvalidInput, TransportError, VimgError
from vimgtools.image import Image
from vimgtools.sync.digests import (
    CHECKSUMS,
    DIGEST_BYTES,
    Changes,
    Hashed,
    Theirs,
    block_digests,
    change_stream,
    changes_of,
    digest_stream,
    hash_ahead,
)
from vimgtools.sync.replica import Expect, Replica, Source, source_of
from vimgtools.sync.scan import CHUNK_SIZE
from vimgtools.sync.state import StateRun
from vimgtools.sync.wire import (
    CHUNK_END,
    DATA,
    DIGESTS,
    DONE,
    ERROR,
    HELLO,
    HOLES,
    OFFSET,
    RANGE,
    READY,
    RESULT,
    WIRE_MAGIC,
    WIRE_VERSION,
    ZERO,
    Channel,
    error_payload,
)

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from vimgtools.sync.signature import Signature

log = logging.getLogger("vimgtools.sync")

_REMOTE = re.compile(r"^(?P<host>(?:[^@/:\s]+@)?(?:\[[^\]/]+\]|[^:/\s\[\]]+)):(?P<path>.*)$")


def split_remote(spec: str) -> tuple[str | None, str]:
    """``[user@]host:path`` -> (host, path); anything else (``./a:b``, ``/x``) is a local path.

    Like rsync: a colon before the first slash makes it remote.
    """
    m = _REMOTE.match(spec)
    if not m or spec.startswith(("/", "./", "../")):
        return None, spec
    host, path = m.group("host"), m.group("path")
    if host.startswith("-") or host.split("@")[-1].startswith("-"):
        raise InvalidInput(f"{spec}: a host name cannot start with '-'")
    if not path:
        raise InvalidInput(f"{spec}: no path after the host name")
    return host, path


# -- the transport ----------------------------------------------------------
@dataclass
class Peer:
    """The far side: a process speaking the protocol on its stdin/stdout."""

    host: str
    proc: subprocess.Popen[bytes]
    channel: Channel
    stderr_tail: deque[str] = field(default_factory=lambda: deque(maxlen=20))

    @classmethod
    def start(cls, host: str, rsh: str, remote_python: str, timeout: float) -> Peer:
        argv = [*shlex.split(rsh), host, f"{shlex.quote(remote_python)} -m vimgtools.sync --server"]
        log.debug("starting %s", argv)
        try:
            # Its own session: Ctrl-C is ours to handle, and close() can end all it started.
            pipe = subprocess.PIPE
            proc = subprocess.Popen(argv, stdin=pipe, stdout=pipe, stderr=pipe, start_new_session=True)
        except OSError as e:
            raise InvalidInput(f"--rsh {rsh!r}: cannot run {argv[0]}: {e.strerror}") from e
        assert proc.stdin is not None and proc.stdout is not None
        peer = cls(host, proc, Channel(proc.stdout.fileno(), proc.stdin.fileno(), peer=host, timeout=timeout))
        threading.Thread(target=peer._drain_stderr, daemon=True).start()
        return peer

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            self.stderr_tail.append(line)
            log.debug("%s: %s", self.host, line)

    def explain(self, e: TransportError) -> TransportError:
        """Add what the far side printed (e.g. "No module named vimgtools") to a transport error."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=2)
        time.sleep(0.05)
        said = " | ".join(line for line in self.stderr_tail if line)[-500:]
        if "No module named" in said:
            return TransportError(f"{self.host}: vimgtools is not installed for the remote Python ({said})")
        return TransportError(f"{e}{' (remote said: ' + said + ')' if said else ''}")

    def close(self) -> None:
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever it started, too
        self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()


# -- the two roles ----------------------------------------------------------
@dataclass
class Session:
    """What both ends agreed on in HELLO/READY."""

    block_size: int
    checksum: str
    key: bytes
    start: int
    end: int


@dataclass
class Figures:
    bytes_read: int = 0
    changed: int = 0
    zero: int = 0


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


Digests = npt.NDArray[np.uint64]


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
            img, sess.start, sess.end, sess.block_size, sess.checksum, sess.key, theirs, keep_cache=keep_cache
        )
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


def _recv_digests(ch: Channel, offset: int, length: int, bs: int) -> npt.NDArray[np.uint64] | None:
    ftype, payload = ch.recv(DIGESTS, HOLES)
    if ftype == HOLES:
        if len(payload) != RANGE.size or RANGE.unpack(payload) != (offset, length):
            raise TransportError(f"{ch.peer}: HOLES for the wrong range")
        return None
    (got,) = OFFSET.unpack_from(payload)
    want = -(-length // bs) * DIGEST_BYTES
    if got != offset or len(payload) - OFFSET.size != want:
        raise TransportError(f"{ch.peer}: digests for the wrong chunk (offset {got}, {len(payload)} bytes)")
    return np.frombuffer(payload[OFFSET.size :], dtype=np.uint64).reshape(-1, 2)


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
            if img is None:  # a new replica: all holes
                for offset in range(sess.start, sess.end, CHUNK_SIZE):
                    ch.send(HOLES, RANGE.pack(offset, min(CHUNK_SIZE, sess.end - offset)))
                return
            for offset, length, mine, zero, read in digest_stream(
                img,
                sess.start,
                sess.end,
                bs,
                sess.checksum,
                sess.key,
                keep_cache=keep_cache,
                size=rep.dst_size,
            ):
                fig.bytes_read += read
                if zero is None:
                    ch.send(HOLES, RANGE.pack(offset, length))
                else:
                    ch.send(DIGESTS, OFFSET.pack(offset), mine.tobytes())
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
            try:
                done = json.loads(bytes(payload))
            except ValueError:
                done = None
            if not isinstance(done, dict):
                raise TransportError(f"{ch.peer}: malformed DONE message")
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


# -- the client ---------------------------------------------------------------
def hello(
    role: str, path: str, sess: Session, options: dict[str, Any], source: Source | None
) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "magic": WIRE_MAGIC.decode(),
        "version": WIRE_VERSION,
        "role": role,
        "path": path,
        "block_size": sess.block_size,
        "chunk_size": CHUNK_SIZE,
        "checksum": sess.checksum,
        "key": sess.key.hex(),
        "options": options,
    }
    if source is not None:
        msg["source"] = source_to_json(source)
    return msg


def source_to_json(s: Source) -> dict[str, Any]:
    return {"size": s.size, "identity": list(s.identity), "token": s.token, "mode": s.mode}


def source_from_json(obj: Any, peer: str) -> Source:
    try:
        size, ident = int(obj["size"]), tuple(int(x) for x in obj["identity"])
        if size < 0 or len(ident) != 3:
            raise ValueError
        return Source(size, (ident[0], ident[1], ident[2]), str(obj["token"]), int(obj["mode"]))
    except (KeyError, TypeError, ValueError) as e:
        raise TransportError(f"{peer}: malformed source description") from e


def new_session(block_size: int, checksum: str, start: int, end: int) -> Session:
    if checksum not in CHECKSUMS:
        raise InvalidInput(f"--checksum {checksum!r}: known are {', '.join(CHECKSUMS)}")
    # A fresh random key each session: collisions cannot be prepared in advance.
    return Session(block_size, checksum, secrets.token_bytes(32), start, end)


def failure_payload(e: BaseException) -> dict[str, Any]:
    if isinstance(e, VimgError):
        return error_payload(e)
    return {"class": "TransportError", "message": f"internal error: {type(e).__name__}: {e}", "exit_code": 1}


def send_error(ch: Channel, e: BaseException) -> None:
    with contextlib.suppress(TransportError, OSError):
        ch.send_json(ERROR, failure_payload(e))


def sync_remote(
    src: str,
    dst: str,
    res: Any,
    *,
    checksum: str = "xxh128",
    rsh: str = "ssh",
    remote_python: str = "python3",
    timeout: float = 300.0,
    options: dict[str, Any],
    progress: Callable[[int, int], None] | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Push (DST remote) or pull (SRC remote), filling ``res`` (a SyncResult)."""
    host_s, path_s = split_remote(src)
    host_d, path_d = split_remote(dst)
    if host_s and host_d:
        raise InvalidInput(f"{src}, {dst}: both are remote; one side must be on this host")
    host = host_d or host_s
    assert host is not None
    keep_cache = bool(options.get("keep_cache"))
    if host_d:  # push: we send SRC
        with Image(Path(path_s)) as img:
            res.size, res.blocks = img.size, -(-img.size // res.block_size)
            from vimgtools.sync import warn_if_written_by_vm

            warn_if_written_by_vm(img, res)
            sess = new_session(res.block_size, checksum, 0, img.size)
            st = (
                StateRun(options["state"], res.block_size, checksum, img.size)
                if options.get("state")
                else None
            )
            if st is not None:
                sess.checksum, sess.key = st.checksum, st.key
            opts = dict(options, state=None, state_expect=st.old.expect.to_json() if st and st.old else None)
            t_connect = time.monotonic()
            peer = Peer.start(host, rsh, remote_python, timeout)
            early: tuple[list[Changes], Generator[Changes, None, None]] | None = None
            ahead: list[Hashed] = []
            try:
                ch = peer.channel
                ch.send_json(HELLO, hello("receiver", path_d, sess, opts, source_of(img)))

                def waiting() -> bool:  # for the far side's first answer
                    return ch.readable() or (stop is not None and stop.is_set())

                if st is not None and st.old is not None:  # changes known without the far side
                    early = _scan_while_connecting(img, sess, st.old, waiting, keep_cache)
                else:  # our digests, at least
                    ahead = hash_ahead(
                        img, 0, sess.end, sess.block_size, sess.checksum, sess.key,
                        stop_when=waiting, limit=EARLY_LIMIT, keep_cache=keep_cache,
                    )  # fmt: skip
                _, ready = ch.recv_json(READY)
                res.seconds_connect = time.monotonic() - t_connect
                sess.start = _resume_point(ready, sess, host)
                stored = st.trusted(ready.get("state_ok") is True) if st is not None else None
                theirs: Theirs = stored or (lambda o, n: _recv_digests(ch, o, n, sess.block_size))
                changes: Iterable[Changes] | None = None
                if early is not None and stored is not None and sess.start == 0:
                    changes = itertools.chain(*early)
                elif early is not None and st is not None and st.old is not None:  # a replica changed since,
                    early[1].close()  # or a resumed run: the early scan is of no use
                    st.old.rewind()
                elif ahead and sess.start == 0:
                    changes = _changes_after(img, sess, ahead, theirs, keep_cache)
                pre = (
                    st.prepass(img, sess.start, sess.block_size, keep_cache, stored is not None) if st else 0
                )
                fig = run_sender(
                    img, sess, theirs, ChannelSink(ch),
                    progress=progress, stop=stop, keep_cache=keep_cache, dry_run=bool(options.get("dry_run")),
                    record=st.writer.add if st else None, changes=changes,
                )  # fmt: skip
                fig.bytes_read += pre
                ch.send_json(DONE, {"bytes_read": fig.bytes_read})
                _, result = ch.recv_json(RESULT)
                if st is not None:
                    after = Expect.from_json(result.get("dst_after"))
                    if after is None or options.get("dry_run"):
                        st.writer.abort()
                    else:
                        st.writer.finish(after)
                    res.state = st.note
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
        for key in ("bytes_written", "journal_bytes", "undo_bytes", "resumed_from", "dst_extra_bytes"):
            setattr(res, key, _int(result, key))
        res.created, res.recovered = bool(result.get("created")), bool(result.get("recovered"))
        res.resized_from = result.get("resized_from")
        flush = result.get("seconds_flush")
        res.seconds_flush = float(flush) if isinstance(flush, (int, float)) else 0.0
    else:  # pull: we receive into DST
        if options.get("state"):
            raise InvalidInput("--state keeps the source's digests: it works when SRC is on this host")
        sess = new_session(res.block_size, checksum, 0, 0)
        t_connect = time.monotonic()
        peer = Peer.start(host, rsh, remote_python, timeout)
        try:
            ch = peer.channel
            ch.send_json(HELLO, hello("sender", path_s, sess, options, None))
            _, ready = ch.recv_json(READY)
            res.seconds_connect = time.monotonic() - t_connect
            source = source_from_json(ready.get("source"), host)
            res.size, res.blocks = source.size, -(-source.size // res.block_size)
            sess.end = source.size
            with Replica(
                Path(path_d), source, block_size=res.block_size, dry_run=bool(options.get("dry_run")),
                allow_shrink=bool(options.get("allow_shrink")), force=bool(options.get("force")),
                journal=options.get("journal"),
            ) as rep:  # fmt: skip
                sess.start = rep.resume_from
                ch.send_json(READY, {"resume_from": rep.resume_from})
                try:
                    fig, done = run_receiver(rep, ch, sess, keep_cache=keep_cache, stop=stop)
                    rep.finish(options.get("undo"))
                    ch.send_json(RESULT, {"bytes_written": rep.bytes_written})
                except BaseException as e:
                    resumable = isinstance(e, (Interrupted, KeyboardInterrupt, TransportError))
                    rep.abort(keep_for_resume=resumable)
                    raise
                res.take_replica(rep)
        except TransportError as e:
            raise peer.explain(e) from e
        finally:
            peer.close()
        res.changed, res.zero = fig.changed, fig.zero
        res.bytes_read = fig.bytes_read + _int(done, "bytes_read")
    res.bytes_sent, res.bytes_received = ch.counters.sent, ch.counters.received


EARLY_LIMIT = 128 << 20  # bytes (changed bytes, or digests) found and held while the far side starts


def _scan_while_connecting(
    img: Image, sess: Session, stored: Signature, stop_when: Callable[[], bool], keep_cache: bool
) -> tuple[list[Changes], Generator[Changes, None, None]]:
    """With a state file SRC's changes are known without the far side: find them while ssh connects.

    Returns the chunks found before the far side answered (at most ``EARLY_LIMIT`` changed bytes
    held) and the stream that goes on from there. Usable only if the far side trusts the state
    and starts at 0; otherwise the caller closes the stream and rewinds ``stored``.
    """
    stream = change_stream(
        img, 0, sess.end, sess.block_size, sess.checksum, sess.key, stored.digests, keep_cache=keep_cache
    )
    found: list[Changes] = []
    held = 0
    while held < EARLY_LIMIT and not stop_when():
        c = next(stream, None)
        if c is None:
            break
        found.append(c.detach())
        held += sum(n for _, n, payload in c.ranges if payload is not None)
    return found, stream


def _changes_after(
    img: Image, sess: Session, ahead: list[Hashed], theirs: Theirs, keep_cache: bool
) -> Iterator[Changes]:
    """The chunks hashed while connecting (their changed blocks read again), then the rest as usual."""
    out = memoryview(bytearray(CHUNK_SIZE))
    for h in ahead:
        yield changes_of(img, h, theirs(h.offset, h.length), sess.block_size, out, keep_cache)
    start = ahead[-1].offset + ahead[-1].length
    yield from change_stream(
        img, start, sess.end, sess.block_size, sess.checksum, sess.key, theirs, keep_cache=keep_cache
    )


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
        _, msg = ch.recv_json(HELLO)
        if msg.get("magic") != WIRE_MAGIC.decode() or msg.get("version") != WIRE_VERSION:
            raise TransportError(
                f"speaks wire version {msg.get('version')!r}, this vimgtools speaks {WIRE_VERSION}: "
                "install the same vimgtools version on both hosts"
            )
        sess, opts = _session_from(msg)
        path = Path(str(msg.get("path", "")))
        if msg.get("role") == "receiver":
            source = source_from_json(msg.get("source"), "client")
            sess.end = source.size
            with Replica(
                path, source, block_size=sess.block_size, dry_run=bool(opts.get("dry_run")),
                allow_shrink=bool(opts.get("allow_shrink")), force=bool(opts.get("force")),
                journal=opts.get("journal"),
            ) as rep:  # fmt: skip
                sess.start = rep.resume_from
                state_ok = rep.trusts(Expect.from_json(opts.get("state_expect")))
                ch.send_json(READY, {"resume_from": rep.resume_from, "state_ok": state_ok})
                try:
                    fig, _ = run_receiver(
                        rep, ch, sess, keep_cache=bool(opts.get("keep_cache")), send_digests=not state_ok
                    )
                    rep.finish(opts.get("undo"))
                    after = rep.expect_after()
                except BaseException as e:
                    resumable = isinstance(e, (Interrupted, KeyboardInterrupt, TransportError))
                    rep.abort(keep_for_resume=resumable)
                    raise
                ch.send_json(
                    RESULT,
                    {
                        "bytes_read": fig.bytes_read, "bytes_written": rep.bytes_written,
                        "journal_bytes": rep.journal_bytes, "undo_bytes": rep.undo_bytes,
                        "resumed_from": rep.resume_from, "dst_extra_bytes": rep.dst_extra_bytes,
                        "created": rep.created, "recovered": rep.recovered, "resized_from": rep.resized_from,
                        "dst_after": after.to_json() if after else None,
                        "seconds_flush": rep.seconds_flush,
                    },
                )  # fmt: skip
        elif msg.get("role") == "sender":
            with Image(path) as img:
                ch.send_json(READY, {"source": source_to_json(source_of(img))})
                sess.end = img.size
                _, start = ch.recv_json(READY)
                sess.start = _resume_point(start, sess, "client")
                fig = run_sender(
                    img, sess, lambda o, n: _recv_digests(ch, o, n, sess.block_size), ChannelSink(ch),
                    keep_cache=bool(opts.get("keep_cache")), dry_run=bool(opts.get("dry_run")),
                )  # fmt: skip
                ch.send_json(DONE, {"bytes_read": fig.bytes_read})
                ch.recv_json(RESULT)
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


def _session_from(msg: dict[str, Any]) -> tuple[Session, dict[str, Any]]:
    from vimgtools.sync import check_block_size

    bs = msg.get("block_size")
    if not isinstance(bs, int):
        raise TransportError("HELLO without a block size")
    check_block_size(bs)
    if msg.get("chunk_size") != CHUNK_SIZE:
        raise TransportError(f"chunk size {msg.get('chunk_size')!r} differs from ours ({CHUNK_SIZE})")
    checksum = msg.get("checksum")
    if checksum not in CHECKSUMS:
        raise TransportError(f"unknown checksum {checksum!r}")
    try:
        key = bytes.fromhex(str(msg.get("key")))
    except ValueError as e:
        raise TransportError("malformed session key") from e
    if len(key) != 32:
        raise TransportError("malformed session key")
    opts = msg.get("options")
    return Session(bs, str(checksum), key, 0, 0), opts if isinstance(opts, dict) else {}


__all__ = [
    "CHECKSUMS",
    "HELLO",
    "READY",
    "RESULT",
    "Peer",
    "Session",
    "block_digests",
    "hello",
    "new_session",
    "run_receiver",
    "run_sender",
    "send_error",
    "serve",
    "source_from_json",
    "split_remote",
    "sync_remote",
]
