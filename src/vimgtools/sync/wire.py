"""The sync wire protocol: small checksummed frames over a pipe (ssh's stdin/stdout).

Every frame is ``FRAME`` (magic, type, payload length) + payload + XXH3-64 of both.
A frame longer than ``MAX_PAYLOAD`` is refused before anything is allocated; a
peer silent for longer than the timeout is given up on. See docs/remote.md.

Conversation (the client starts the far side with ``python3 -m vimgtools.sync --server``):

    client -> server   HELLO    json: version, role of the server, path, block size, hash, seed, ...
    server -> client   READY    json: image size, resume position, ...   (or ERROR json: message, exit code)
    receiver -> sender DIGESTS  offset, then one digest per block of a chunk | HOLES offset, length
    sender -> receiver DATA     offset + bytes | ZERO offset, length | CHUNK_END offset
    sender -> receiver DONE     json: figures of the sender
    receiver -> sender RESULT   json: figures of the receiver (or ERROR)
    with --verify, after RESULT: the far side (the server) reads its image again and sends
    its digests, DIGESTS | HOLES per chunk from 0 on; the client compares them with its own
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import struct
import threading
from typing import TYPE_CHECKING, Any

from vimgtools import errors
from vimgtools.blocks import checksum64
from vimgtools.errors import InvalidInput, TransportError, VimgError

if TYPE_CHECKING:
    from typing_extensions import Buffer

WIRE_MAGIC = b"VIMGSYNC"
WIRE_VERSION = 2  # 2: options as SyncOptions.for_peer, the --verify exchange after RESULT
FRAME_MAGIC = b"VS"
FRAME = struct.Struct("<2sBxI")  # magic, type, payload length
_SUM = struct.Struct("<Q")
MAX_PAYLOAD = (8 << 20) + 64  # one chunk of data plus its offset
DEFAULT_TIMEOUT = 300.0
F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ, Linux
PIPE_SIZE = 1 << 20  # the default /proc/sys/fs/pipe-max-size

HELLO, READY, ERROR, DIGESTS, HOLES, DATA, ZERO, CHUNK_END, DONE, RESULT = range(1, 11)
NAMES = {
    HELLO: "HELLO",
    READY: "READY",
    ERROR: "ERROR",
    DIGESTS: "DIGESTS",
    HOLES: "HOLES",
    DATA: "DATA",
    ZERO: "ZERO",
    CHUNK_END: "CHUNK_END",
    DONE: "DONE",
    RESULT: "RESULT",
}
OFFSET = struct.Struct("<Q")
RANGE = struct.Struct("<QQ")


class Counters:
    """Bytes through a channel."""

    def __init__(self) -> None:
        self.sent = 0
        self.received = 0


class Channel:
    """Frames over a pair of file descriptors: one reader; writers serialised by a lock."""

    def __init__(self, rfd: int, wfd: int, *, peer: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.rfd, self.wfd = rfd, wfd
        self.peer = peer
        self.timeout = timeout
        self.counters = Counters()
        self._buf = bytearray()
        self._pos = 0  # start of the unread part of _buf (consumed frames are dropped lazily)
        self._send_lock = threading.Lock()  # the digest thread and the main thread both send
        for fd in (rfd, wfd):  # 1 MiB pipes instead of 64 KiB: 16 times fewer wake-ups per MiB
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)

    # -- sending --------------------------------------------------------
    def send(self, ftype: int, *parts: Buffer) -> None:
        length = sum(len(memoryview(p)) for p in parts)
        if length > MAX_PAYLOAD:
            raise ValueError(f"frame of {length} bytes exceeds {MAX_PAYLOAD}")
        frame = bytearray(FRAME.pack(FRAME_MAGIC, ftype, length))
        for p in parts:
            frame += memoryview(p)
        frame += _SUM.pack(checksum64(frame))
        with self._send_lock:
            self._write_all(frame)
            self.counters.sent += len(frame)

    def send_json(self, ftype: int, obj: dict[str, Any]) -> None:
        import json  # here, as in loads_object

        self.send(ftype, json.dumps(obj, sort_keys=True).encode())

    def _write_all(self, data: Buffer) -> None:
        view = memoryview(data).cast("B")
        while view:
            try:
                n = os.write(self.wfd, view)
            except BrokenPipeError:
                raise TransportError(f"{self.peer}: connection closed by the far side") from None
            except OSError as e:
                raise TransportError(f"{self.peer}: sending: {e.strerror}") from e
            view = view[n:]

    # -- receiving ------------------------------------------------------
    def readable(self) -> bool:
        """Whether the peer has sent something (or hung up) that ``recv`` would now get at once."""
        if len(self._buf) > self._pos:
            return True
        return bool(select.select([self.rfd], [], [], 0)[0])

    def _fill(self, want: int) -> None:
        """Have at least ``want`` unread bytes buffered."""
        while len(self._buf) - self._pos < want:
            if self._pos:  # drop what was consumed, once per read rather than once per frame
                del self._buf[: self._pos]
                self._pos = 0
            self._wait_readable()
            chunk = os.read(self.rfd, max(want - len(self._buf), 1 << 20))
            if not chunk:
                raise TransportError(f"{self.peer}: connection closed in the middle of the conversation")
            self._buf += chunk

    def _take(self, total: int) -> bytearray:
        """The next ``total`` bytes, as a buffer of their own (a big frame is read straight into it)."""
        have = len(self._buf) - self._pos
        if have >= total or total < (1 << 20):
            self._fill(total)
            frame = self._buf[self._pos : self._pos + total]
            self._pos += total
            return frame
        frame = bytearray(total)
        frame[:have] = memoryview(self._buf)[self._pos :]
        del self._buf[:]
        self._pos = 0
        view = memoryview(frame)[have:]
        while view:
            self._wait_readable()
            n = os.readv(self.rfd, [view])
            if not n:
                raise TransportError(f"{self.peer}: connection closed in the middle of the conversation")
            view = view[n:]
        return frame

    def _wait_readable(self) -> None:
        ready, _, _ = select.select([self.rfd], [], [], self.timeout)
        if not ready:
            raise TransportError(f"{self.peer}: no data for {self.timeout:.0f} s; giving up")

    def recv(self, *expected: int) -> tuple[int, memoryview]:
        """The next frame, checked; ``expected`` limits which types are acceptable here."""
        self._fill(FRAME.size)
        magic, ftype, length = FRAME.unpack_from(self._buf, self._pos)
        if magic != FRAME_MAGIC:
            raise TransportError(f"{self.peer}: garbage on the wire (not a vimgtools.sync peer?)")
        if length > MAX_PAYLOAD:
            raise TransportError(f"{self.peer}: refused a frame of {length} bytes (limit {MAX_PAYLOAD})")
        total = FRAME.size + length + _SUM.size
        frame = self._take(total)
        (stored,) = _SUM.unpack_from(frame, FRAME.size + length)
        if checksum64(memoryview(frame)[: FRAME.size + length]) != stored:
            raise TransportError(f"{self.peer}: frame checksum mismatch (corrupted stream)")
        self.counters.received += total
        payload = memoryview(frame)[FRAME.size : FRAME.size + length]
        if ftype == ERROR and ERROR not in expected:
            raise remote_error(self.peer, payload)
        if expected and ftype not in expected:
            want = "/".join(NAMES.get(t, str(t)) for t in expected)
            raise TransportError(
                f"{self.peer}: protocol error: got {NAMES.get(ftype, ftype)}, expected {want}"
            )
        return ftype, payload

    def recv_json(self, *expected: int) -> tuple[int, dict[str, Any]]:
        ftype, payload = self.recv(*expected)
        return ftype, loads_object(payload, f"{self.peer}: malformed {NAMES.get(ftype, ftype)} message")


def loads_object(payload: Buffer, malformed: str) -> dict[str, Any]:
    """A JSON object from a frame's payload; TransportError(malformed) if it is not one."""
    import json  # here: a local run speaks no JSON (~5 ms of start-up)

    try:
        obj = json.loads(bytes(memoryview(payload)))
    except ValueError as e:
        raise TransportError(malformed) from e
    if not isinstance(obj, dict):
        raise TransportError(malformed)
    return obj


def recv_hello(ch: Channel) -> dict[str, Any]:
    """The client's HELLO, refused unless it speaks our magic and wire version."""
    _, msg = ch.recv_json(HELLO)
    if msg.get("magic") != WIRE_MAGIC.decode() or msg.get("version") != WIRE_VERSION:
        raise TransportError(
            f"speaks wire version {msg.get('version')!r}, this vimgtools speaks {WIRE_VERSION}: "
            "install the same vimgtools version on both hosts"
        )
    return msg


def remote_error(peer: str, payload: Buffer) -> Exception:
    """An ERROR frame becomes the same exception class on this side, named after the peer."""
    try:
        obj = loads_object(payload, "unreadable error message")
        cls = getattr(errors, str(obj.get("class", "")), None)
        message = str(obj.get("message", "unknown error"))
        option = obj.get("option")
    except TransportError:
        cls, message, option = None, "unreadable error message", None
    if not (isinstance(cls, type) and issubclass(cls, errors.VimgError)):
        cls = TransportError
    if cls is InvalidInput and isinstance(option, str):
        return InvalidInput(f"{peer}: {message}", option=option)
    return cls(f"{peer}: {message}")


def error_payload(e: BaseException) -> dict[str, Any]:
    """An exception as an ERROR frame's message; anything not a VimgError is an internal error."""
    if not isinstance(e, VimgError):
        return {
            "class": "TransportError",
            "message": f"internal error: {type(e).__name__}: {e}",
            "exit_code": 1,
        }
    obj: dict[str, Any] = {"class": type(e).__name__, "message": str(e), "exit_code": e.exit_code}
    if isinstance(e, InvalidInput) and e.option:
        obj["option"], obj["message"] = e.option, e.reason
    return obj


def send_error(ch: Channel, e: BaseException) -> None:
    """Tell the peer why we stop, if it still listens."""
    with contextlib.suppress(TransportError, OSError):
        ch.send_json(ERROR, error_payload(e))
