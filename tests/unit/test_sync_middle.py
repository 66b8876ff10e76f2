"""The middle of sync, in-process: the replica's lifecycle, sender and receiver over a socketpair,
hostile frames, the server and the --verify exchange. Real files in tmp_path; no ssh, no subprocess."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from inproc import Background, channel_pair

from vimgtools.errors import ImageError, ImageRefused, Interrupted, TransportError
from vimgtools.image import Image
from vimgtools.journal import JOURNAL_SUFFIX
from vimgtools.sync import rollback
from vimgtools.sync import undo as undo_module
from vimgtools.sync.chunks import CHUNK_SIZE
from vimgtools.sync.options import SyncOptions
from vimgtools.sync.receiver import run_receiver, stream_digests
from vimgtools.sync.remote import _compare_with_far_side, hello, serve, source_to_json
from vimgtools.sync.replica import Replica, source_of
from vimgtools.sync.sender import ChannelSink, Session, recv_digests, run_sender
from vimgtools.sync.wire import CHUNK_END, DATA, DONE, ERROR, HELLO, OFFSET, RANGE, READY, RESULT, ZERO

MiB = 1 << 20
BS = 4096
SIZE = 2 * CHUNK_SIZE + 3 * MiB  # three chunks
KEY = bytes(range(32))


def make(path: Path, seed: int, extents: list[tuple[int, int]]) -> Path:
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for off, n in extents:
            f.seek(off)
            f.write(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def images(tmp_path: Path) -> tuple[Path, Path]:
    dst = make(tmp_path / "dst.img", 1, [(0, MiB), (CHUNK_SIZE + MiB, MiB), (SIZE - MiB, MiB)])
    src = tmp_path / "src.img"
    src.write_bytes(dst.read_bytes())
    with open(src, "r+b") as f:  # a change in each chunk, and one region zeroed
        for off in (4096, CHUNK_SIZE + MiB + 8192, SIZE - 4096):
            f.seek(off)
            f.write(b"new!" * 1024)
        f.seek(CHUNK_SIZE + MiB + 65536)
        f.write(bytes(65536))
    return src, dst


def session(end: int, start: int = 0) -> Session:
    return Session(BS, "xxh128", KEY, start, end)


# -- sender and receiver ---------------------------------------------------------------------------
def test_sender_and_receiver_over_an_in_process_channel(images: tuple[Path, Path]) -> None:
    src, dst = images
    with channel_pair() as (tx, rx), Image(src) as img:
        sess = session(img.size)

        def receive() -> tuple[object, dict[str, object]]:
            with Replica(dst, source_of(img), block_size=BS) as rep, rep.receiving():
                return run_receiver(rep, rx, session(img.size))

        far = Background(receive)
        fig = run_sender(img, sess, lambda o, n: recv_digests(tx, o, n, BS), ChannelSink(tx))
        tx.send_json(DONE, {"bytes_read": fig.bytes_read})
        rfig, done = far.result()
    assert sha(src) == sha(dst)
    assert fig.changed == rfig.changed == 3 + 16  # three 4 KiB writes, 16 blocks zeroed
    assert fig.zero == 16 and done == {"bytes_read": fig.bytes_read}
    assert not dst.with_name(dst.name + JOURNAL_SUFFIX).exists()


HOSTILE = {
    "outside-chunk": (DATA, OFFSET.pack(CHUNK_SIZE) + b"x" * BS, "outside the chunk"),
    "misaligned": (DATA, OFFSET.pack(100) + b"x" * BS, "outside the chunk"),
    "empty-data": (DATA, OFFSET.pack(0), "empty DATA frame"),
    "bad-zero": (ZERO, b"short", "malformed ZERO frame"),
    "zero-past-end": (ZERO, RANGE.pack(0, SIZE + BS), "outside the chunk"),
    "chunk-end-out-of-order": (CHUNK_END, OFFSET.pack(2 * CHUNK_SIZE), "chunk end out of order"),
    "done-too-early": (DONE, b"{}", "DONE before the end"),
}


@pytest.mark.parametrize("attack", sorted(HOSTILE))
def test_receiver_refuses_hostile_frames(images: tuple[Path, Path], attack: str) -> None:
    src, dst = images
    before = sha(dst)
    ftype, payload, message = HOSTILE[attack]
    with channel_pair() as (tx, rx), Image(src) as img:

        def receive() -> object:
            with Replica(dst, source_of(img), block_size=BS) as rep, rep.receiving():
                return run_receiver(rep, rx, session(img.size))

        far = Background(receive)
        tx.send(ftype, payload)
        with pytest.raises(TransportError, match=message):
            far.result()
    assert sha(dst) == before
    assert not dst.with_name(dst.name + JOURNAL_SUFFIX).exists()  # nothing to resume: removed


def test_serve_receives_a_push_in_process(images: tuple[Path, Path]) -> None:
    src, dst = images
    with channel_pair() as (tx, rx), Image(src) as img:
        server = Background(lambda: serve(rx.rfd, rx.wfd, timeout=10))
        sess = session(img.size)
        tx.send_json(HELLO, hello("receiver", str(dst), sess, SyncOptions(verify=True), source_of(img)))
        _, ready = tx.recv_json(READY)
        assert ready["resume_from"] == 0
        fig = run_sender(img, sess, lambda o, n: recv_digests(tx, o, n, BS), ChannelSink(tx))
        tx.send_json(DONE, {"bytes_read": fig.bytes_read})
        _, result = tx.recv_json(RESULT)
        assert result["bytes_written"] > 0 and result["dst_after"] is not None
        assert _compare_with_far_side(tx, img, sess, keep_cache=False) is True  # the --verify exchange
        assert server.result() == 0
    assert sha(src) == sha(dst)


def test_serve_answers_a_foreign_version_with_an_error(images: tuple[Path, Path]) -> None:
    src, dst = images
    with channel_pair() as (tx, rx), Image(src) as img:
        server = Background(lambda: serve(rx.rfd, rx.wfd, timeout=10))
        msg = hello("receiver", str(dst), session(img.size), SyncOptions(), source_of(img))
        tx.send_json(HELLO, dict(msg, version=1, source=source_to_json(source_of(img))))
        _, payload = tx.recv(ERROR)
        assert "wire version 1" in json.loads(bytes(payload))["message"]
        assert server.result() == 1


def test_verify_exchange_finds_a_replica_that_differs(images: tuple[Path, Path]) -> None:
    src, dst = images  # dst still differs from src
    with channel_pair() as (tx, rx), Image(src) as mine, Image(dst) as theirs:
        far = Background(lambda: stream_digests(rx, theirs, session(theirs.size), keep_cache=False))
        assert _compare_with_far_side(tx, mine, session(mine.size), keep_cache=False) is False
        far.result()


# -- the replica's lifecycle -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "error, after_checkpoint, kept",
    [
        (Interrupted("stop"), True, True),
        (KeyboardInterrupt(), True, True),
        (TransportError("peer gone"), True, True),
        (Interrupted("stop"), False, False),  # no resume point yet: nothing worth keeping
        (ImageError("disk full"), True, False),
        (RuntimeError("a bug"), True, False),
    ],
)
def test_replica_keeps_its_journal_only_to_resume(
    images: tuple[Path, Path], error: BaseException, after_checkpoint: bool, kept: bool
) -> None:
    src, dst = images
    before = sha(dst)
    journal = dst.with_name(dst.name + JOURNAL_SUFFIX)
    with Image(src) as img:
        source = source_of(img)
    with pytest.raises(type(error)), Replica(dst, source, block_size=BS) as rep, rep.receiving():
        rep.data(0, b"y" * BS)
        if after_checkpoint:
            rep.end_chunk(CHUNK_SIZE)
        raise error
    assert sha(dst) == before
    assert journal.exists() == kept
    with Replica(dst, source, block_size=BS) as rep:
        assert rep.resume_from == (CHUNK_SIZE if kept else 0)
        rep.abort(keep_for_resume=False)
    assert not journal.exists()


def test_replica_commits_with_undo_and_rolls_back(images: tuple[Path, Path], tmp_path: Path) -> None:
    src, dst = images
    before = sha(dst)
    undo = tmp_path / "u.undo"
    with Image(src) as img:
        source = source_of(img)
    with Replica(dst, source, block_size=BS) as rep, rep.receiving(undo):
        rep.data(0, b"z" * BS)
        rep.zero(CHUNK_SIZE + MiB, BS)
        rep.end_chunk(SIZE)
    assert rep.figures()["bytes_written"] == BS and rep.figures()["undo_bytes"] == 2 * BS
    assert dst.read_bytes()[:BS] == b"z" * BS
    assert rollback(dst, undo, dry_run=True) == 2 * BS and dst.read_bytes()[:BS] == b"z" * BS
    assert rollback(dst, undo) == 2 * BS
    assert sha(dst) == before


def test_undo_read_at_the_end_in_batches(
    images: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Changes that bring no old content (a push's far side, --state): the undo file is read from the
    replica before the commit, its ranges asked for a batch at a time; every batch boundary holds."""
    monkeypatch.setattr(undo_module, "PREFETCH_BYTES", 2 * BS)  # batches of two records
    src, dst = images
    before = sha(dst)
    undo = tmp_path / "u.undo"
    with Image(src) as img:
        source = source_of(img)
    with Replica(dst, source, block_size=BS) as rep, rep.receiving(undo):
        assert not rep.wants_old
        for i in range(5):
            rep.data(i * 3 * BS, bytes([i + 1]) * BS)
        rep.zero(CHUNK_SIZE + MiB, 3 * BS)  # one record larger than a batch
        rep.data(CHUNK_SIZE + 2 * MiB, b"w" * BS)
        rep.end_chunk(SIZE)
    assert rep.figures()["undo_bytes"] >= 6 * BS  # the data records' old content (a hole: a ZERO record)
    assert rollback(dst, undo) and sha(dst) == before


def test_rollback_of_a_sync_that_died_before_its_journal_commit(
    images: tuple[Path, Path], tmp_path: Path
) -> None:
    """Killed between the undo file's commit and the journal's: the replica is still the old content,
    and putting it back is a no-op, not a refusal (replicate's restore after a kill -9 at that point)."""
    src, dst = images
    old = dst.read_bytes()
    undo = tmp_path / "u.undo"
    with Image(src) as img:
        source = source_of(img)
    with Replica(dst, source, block_size=BS) as rep, rep.receiving(undo):
        rep.data(0, b"z" * BS)
        rep.zero(CHUNK_SIZE + MiB, BS)
        rep.end_chunk(SIZE)
    dst.write_bytes(old)  # as if nothing of the journal had been written
    assert rollback(dst, undo) == 2 * BS and dst.read_bytes() == old
    with open(dst, "r+b") as f:  # something else wrote there: neither generation
        f.write(b"q" * BS)
    with pytest.raises(ImageRefused, match="changed since the sync"):
        rollback(dst, undo)


def test_a_new_replica_appears_only_when_complete(images: tuple[Path, Path], tmp_path: Path) -> None:
    src, _ = images
    new = tmp_path / "new.img"
    with Image(src) as img:
        source = source_of(img)
    with Replica(new, source, block_size=BS, dry_run=True) as rep, rep.receiving():
        rep.data(0, b"d" * BS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst.img", "src.img"]  # a dry run made nothing
    with pytest.raises(Interrupted), Replica(new, source, block_size=BS) as rep, rep.receiving():
        rep.data(0, b"d" * BS)
        raise Interrupted("stop")
    assert not new.exists()
    with Replica(new, source, block_size=BS) as rep, rep.receiving():
        rep.data(0, b"d" * BS)
    assert new.stat().st_size == SIZE and new.read_bytes()[:BS] == b"d" * BS


@pytest.mark.parametrize("state", [False, True], ids=["compare", "state"])
def test_every_read_lands_in_an_aligned_buffer(
    images: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, state: bool
) -> None:
    """The kernel copied out of the page cache at 1.7 GB/s into a buffer 16 bytes past a page
    boundary (a 1 MiB bytearray's start) and at 7.5 GB/s into an aligned one (chunks.fresh_buffer).
    The format probe's 512-byte reads are left out."""
    import ctypes

    from vimgtools.sync import sync

    src, dst = images
    seen: list[int] = []
    read_into = Image.read_into

    def recording(self: Image, buf: memoryview, offset: int, *, probe: bool = True) -> tuple[int, int]:
        if len(buf) >= BS:
            seen.append(ctypes.addressof(ctypes.c_char.from_buffer(buf)) % 64)
        return read_into(self, buf, offset, probe=probe)

    monkeypatch.setattr(Image, "read_into", recording)
    r = sync(src, dst, SyncOptions(state=str(tmp_path / "S") if state else None))
    assert r.changed and seen and set(seen) == {0}, sorted(set(seen))
    assert sha(src) == sha(dst)
