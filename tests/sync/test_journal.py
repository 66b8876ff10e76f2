"""The journal format: damaged and foreign files are refused, torn tails ignored, apply_runs is atomic."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from synchelp import MiB, cli, digest, write_image

from vimgtools.errors import JournalError
from vimgtools.image import Image
from vimgtools.journal import (
    HEADER_SIZE,
    JOURNAL_MAGIC,
    RECORD_SIZE,
    Header,
    JournalWriter,
    UnstartedJournal,
    apply_runs,
    committed_journal,
    read_journal,
    recover_image,
)


def test_apply_runs_writes_and_resizes(tmp_path: Path) -> None:
    img = write_image(tmp_path / "disk.img", 4 * MiB, [(0, 4 * MiB)], seed=1)
    want = bytearray(img.read_bytes()) + bytes(MiB)
    want[4096:8192] = b"a" * 4096
    want[3 * MiB : 3 * MiB + 10] = b"b" * 10
    n = apply_runs(img, [(4096, b"a" * 4096), (3 * MiB, b"b" * 10)], new_size=5 * MiB)
    assert n == 4096 + 10
    assert img.read_bytes() == want
    assert not (tmp_path / "disk.img.vimg-journal").exists()


def test_apply_runs_failing_midway_changes_nothing(tmp_path: Path) -> None:
    img = write_image(tmp_path / "disk.img", MiB, [(0, MiB)], seed=2)
    before = digest(img)

    def runs():  # type: ignore[no-untyped-def]
        yield 0, b"x" * 4096
        raise RuntimeError("the producer failed")

    with pytest.raises(RuntimeError):
        apply_runs(img, runs())
    assert digest(img) == before
    assert not (tmp_path / "disk.img.vimg-journal").exists()


def _journal(tmp_path: Path, img: Path, commit: bool) -> Path:
    j = tmp_path / "j"
    with Image(img) as d:
        w = JournalWriter(j, Header(JOURNAL_MAGIC, 4096, d.size, d.size))
    w.data(0, b"new!" * 1024)
    w.checkpoint(MiB)
    w.data(8192, b"more" * 1024)
    if commit:
        w.commit()
    w.close()
    return j


def test_torn_tail_is_ignored_and_committed_journal_replays(tmp_path: Path) -> None:
    img = write_image(tmp_path / "disk.img", MiB, [(0, MiB)], seed=3)
    j = _journal(tmp_path, img, commit=False)
    c = read_journal(j)
    assert (
        not c.committed and c.checkpoint == MiB and c.data_bytes == 4096
    )  # the unfinished part is not counted
    j = _journal(tmp_path, img, commit=True)
    with Image(img, write=True) as d:
        assert recover_image(d, j) == 8192
    assert img.read_bytes()[:4] == b"new!" and img.read_bytes()[8192:8196] == b"more"


def test_damaged_payload_before_commit_means_not_committed(tmp_path: Path) -> None:
    img = write_image(tmp_path / "disk.img", MiB, [(0, MiB)], seed=4)
    before = digest(img)
    j = _journal(tmp_path, img, commit=True)
    with open(j, "r+b") as f:  # flip a byte in the first payload
        f.seek(HEADER_SIZE + 100)
        b = f.read(1)
        f.seek(HEADER_SIZE + 100)
        f.write(bytes([b[0] ^ 0xFF]))
    assert not read_journal(j).committed
    with Image(img, write=True) as d:
        assert recover_image(d, j) is None
    assert digest(img) == before


@pytest.mark.parametrize("mapped", [False, True])
@pytest.mark.parametrize("cut", ["torn", "flipped"])
def test_read_through_a_mapping_or_not_the_same_records_count(tmp_path: Path, cut: str, mapped: bool) -> None:
    """A walk over a mapping (under the image's lock) stops where a pread walk does."""
    img = write_image(tmp_path / "disk.img", MiB, [(0, MiB)], seed=6)
    j = _journal(tmp_path, img, commit=True)
    raw = bytearray(j.read_bytes())
    if cut == "torn":  # cut inside the second payload: it and the COMMIT are gone
        del raw[len(raw) - RECORD_SIZE - 100 :]
    else:  # a byte of the second payload flipped
        raw[len(raw) - RECORD_SIZE - 100] ^= 0xFF
    j.write_bytes(raw)
    c = read_journal(j, mapped=mapped)
    assert not c.committed and c.checkpoint == MiB and c.data_bytes == 4096


def test_replay_through_a_mapping_leaves_nothing_open(tmp_path: Path) -> None:
    img = write_image(tmp_path / "disk.img", MiB, [(0, MiB)], seed=7)
    j = _journal(tmp_path, img, commit=True)
    with Image(img, write=True) as d:
        before = sorted(os.listdir("/proc/self/fd"))
        assert recover_image(d, j) == 8192
        assert sorted(os.listdir("/proc/self/fd")) == before  # the mapping's own descriptor too
    assert not j.exists() and img.read_bytes()[8192:8196] == b"more"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda raw: b"NOTAJRNL" + raw[8:], "not a vimgtools journal"),
        (lambda raw: raw[:8] + (99).to_bytes(4, "little") + raw[12:], "format version 99"),
        (lambda raw: raw[:40] + b"\xff" + raw[41:], "header checksum mismatch"),
        (lambda raw: raw[:30], "truncated header"),
    ],
)
def test_foreign_or_damaged_header_is_refused(tmp_path: Path, damage, message: str) -> None:  # type: ignore[no-untyped-def]
    img = write_image(tmp_path / "disk.img", MiB, [(0, MiB)], seed=5)
    j = _journal(tmp_path, img, commit=True)
    j.write_bytes(damage(j.read_bytes()))
    with pytest.raises(JournalError, match=message):
        read_journal(j)
    # The CLI says so in one line and exits 1, leaving the image alone.
    before = digest(img)
    p = cli("--recover", img, "--journal", j, check=1)
    assert message in p.stderr
    assert digest(img) == before


@pytest.mark.parametrize(
    "left", [b"", bytes(HEADER_SIZE), bytes(HEADER_SIZE + RECORD_SIZE)], ids=["empty", "zeros", "zeros+"]
)
def test_a_journal_killed_as_it_was_made_is_no_obstacle(tmp_path: Path, left: bytes) -> None:
    # kill -9 between the journal's creation and its header (CI caught one): recover has nothing
    # to do, dry runs say so, and the next sync starts over.
    src = write_image(tmp_path / "src.img", 2 * MiB, [(0, 2 * MiB)], seed=8)
    dst = write_image(tmp_path / "dst.img", 2 * MiB, [(0, 2 * MiB)], seed=9)
    j = tmp_path / "dst.img.vimg-journal"
    j.write_bytes(left)
    with pytest.raises(UnstartedJournal, match="stopped as it began"):
        read_journal(j)
    assert committed_journal(j) is None
    before = digest(dst)
    for args in (["--recover", dst], ["-n", "--recover", dst], ["-n", src, dst]):
        cli(*args)
        assert digest(dst) == before and j.read_bytes() == left
    p = cli(src, dst)
    assert "starting over" in p.stderr
    assert digest(dst) == digest(src) and not j.exists()


def test_journal_of_another_image_is_refused(tmp_path: Path) -> None:
    a = write_image(tmp_path / "a.img", MiB, [(0, MiB)], seed=6)
    b = write_image(tmp_path / "b.img", MiB, [(0, MiB)], seed=7)
    j = tmp_path / "j"
    with Image(a) as d:
        w = JournalWriter(j, Header(JOURNAL_MAGIC, 4096, MiB, MiB, dst_id=(*d.identity, 0)))
    w.data(0, b"z" * 4096)
    w.commit()
    w.close()
    before = digest(b)
    p = cli("--recover", b, "--journal", j, check=1)
    assert "belongs to another image" in p.stderr
    assert digest(b) == before
    os.unlink(j)


def test_applying_a_large_journal_keeps_the_resident_set_small(tmp_path: Path) -> None:
    """The walks read the journal through a mapping; pages they left behind are let go, so a
    night with many changes does not grow the process (96 MiB journaled: peak RSS 111 MiB
    before, 50 MiB now, most of it the interpreter and the pipeline's buffers)."""
    import subprocess
    import sys

    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    src.write_bytes(os.urandom(96 * MiB))
    dst.write_bytes(bytes(96 * MiB))
    # ru_maxrss counts a child's pages from before its exec (a fork of this big worker): the CLI
    # is started from a small interpreter that reports its child's peak.
    code = (
        "import os, sys\n"
        f"pid = os.spawnv(os.P_NOWAIT, sys.executable, [sys.executable, '-m', 'vimgtools.sync', '-q', {str(src)!r}, {str(dst)!r}])\n"
        "_, status, usage = os.wait4(pid, 0)\n"
        "print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)\n"
    )
    rc, kib = map(
        int,
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.split(),
    )
    assert rc == 0
    assert digest(src) == digest(dst)
    peak = kib << 10
    assert peak < 90 * MiB, f"peak RSS {peak / MiB:.0f} MiB"
