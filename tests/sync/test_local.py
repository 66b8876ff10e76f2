"""Local sync on real sparse files through the CLI and the library."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
from synchelp import MiB, allocated, cli, cli_json, data_extents, digest, poke, write_image

import vimgtools
from vimgtools.errors import ImageRefused, InvalidInput
from vimgtools.sync import sync
from vimgtools.sync.chunks import PIECE

SIZE = 64 * MiB


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    """A 64 MiB source with holes, and a replica already equal to it."""
    src = write_image(tmp_path / "src.img", SIZE, [(0, 4 * MiB), (20 * MiB, 8 * MiB), (60 * MiB, MiB)])
    dst = tmp_path / "dst.img"
    cli(src, dst)
    return src, dst


def test_creates_a_sparse_identical_replica(tmp_path: Path) -> None:
    src = write_image(tmp_path / "src.img", SIZE, [(MiB, 2 * MiB), (40 * MiB, MiB)], seed=1)
    dst = tmp_path / "dst.img"
    r = cli_json(src, dst)
    assert digest(src) == digest(dst)
    assert r["created"] is True
    assert data_extents(dst) == data_extents(src)  # holes stay holes
    assert allocated(dst) <= 3 * MiB + 64 * 1024
    assert r["bytes_written"] == 3 * MiB
    assert r["bytes_read"] == 3 * MiB  # the holes were never read


def test_writes_only_changed_pages(pair: tuple[Path, Path]) -> None:
    src, dst = pair
    poke(src, 5000, b"x")  # one byte in page 1
    poke(src, 21 * MiB + 4096 * 3, b"y" * 5000)  # two pages
    r = cli_json(src, dst)
    assert digest(src) == digest(dst)
    assert r["changed"] == 3
    assert r["bytes_written"] == 3 * 4096
    assert r["journal_bytes"] == 3 * 4096
    for key in ("blocks", "changed", "zero", "bytes_read", "bytes_written", "journal_bytes", "seconds"):
        assert key in r
    assert r["block_size"] == 4096 and r["blocks"] == SIZE // 4096


def test_identical_images_write_nothing(pair: tuple[Path, Path]) -> None:
    src, dst = pair
    before = os.stat(dst).st_mtime_ns
    r = cli_json(src, dst)
    assert r["changed"] == 0 and r["bytes_written"] == 0
    assert os.stat(dst).st_mtime_ns == before
    assert not (dst.parent / "dst.img.vimg-journal").exists()


def test_zero_blocks_become_holes(pair: tuple[Path, Path]) -> None:
    src, dst = pair
    poke(src, 20 * MiB, bytes(2 * MiB))  # trimmed in the guest: zeros, still allocated in src
    before = allocated(dst)
    r = cli_json(src, dst)
    assert digest(src) == digest(dst)
    assert r["zero"] == 512 and r["bytes_written"] == 0
    assert allocated(dst) == before - 2 * MiB  # punched, not written
    assert (20 * MiB, 2 * MiB) not in data_extents(dst)


def test_src_hole_over_dst_data_is_punched(pair: tuple[Path, Path]) -> None:
    src, dst = pair
    import ctypes

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    fd = os.open(src, os.O_RDWR)  # deallocate in src: a hole where dst has data
    assert libc.fallocate(fd, 3, ctypes.c_int64(0), ctypes.c_int64(MiB)) == 0
    os.close(fd)
    r = cli_json(src, dst)
    assert digest(src) == digest(dst)
    assert r["zero"] == 256
    assert data_extents(dst)[0][0] == MiB


def test_block_size_option_and_suffixes(pair: tuple[Path, Path]) -> None:
    src, dst = pair
    poke(src, 100, b"z")
    r = cli_json("--block-size", "64K", src, dst)
    assert r["block_size"] == 65536 and r["changed"] == 1 and r["bytes_written"] == 65536


@pytest.mark.parametrize("bad", ["3K", "2K", "16M", "32M", "abc", "0"])
def test_bad_block_size_exit_2(pair: tuple[Path, Path], bad: str) -> None:
    src, dst = pair
    p = cli("--block-size", bad, src, dst, check=2)
    assert "block" in p.stderr.lower() or "size" in p.stderr.lower()
    assert "Traceback" not in p.stderr


def test_dry_run_writes_nothing(pair: tuple[Path, Path], tmp_path: Path) -> None:
    src, dst = pair
    poke(src, 0, b"changed")
    before = digest(dst)
    r = cli_json("--dry-run", src, dst)
    assert r["changed"] == 1 and r["bytes_written"] == 0 and r["dry_run"] is True
    assert digest(dst) == before
    r = cli_json("-n", src, tmp_path / "new.img")
    assert not (tmp_path / "new.img").exists() and r["created"] is True


def test_grow_and_shrink(pair: tuple[Path, Path], tmp_path: Path) -> None:
    src, dst = pair
    with open(src, "r+b") as f:
        f.truncate(SIZE + 8 * MiB)
    poke(src, SIZE + MiB, b"tail")
    r = cli_json(src, dst)
    assert r["resized_from"] == SIZE and os.path.getsize(dst) == SIZE + 8 * MiB
    assert digest(src) == digest(dst)
    with open(src, "r+b") as f:
        f.truncate(SIZE // 2)
    before = digest(dst)
    p = cli(src, dst, check=2)
    assert "--allow-shrink" in p.stderr and str(dst) in p.stderr
    assert digest(dst) == before
    cli("--allow-shrink", src, dst)
    assert digest(src) == digest(dst) and os.path.getsize(dst) == SIZE // 2


def test_same_file_refused(pair: tuple[Path, Path], tmp_path: Path) -> None:
    src, _ = pair
    before = digest(src)
    os.link(src, tmp_path / "hard.img")
    os.symlink(src, tmp_path / "soft.img")
    for other in (src, tmp_path / "hard.img", tmp_path / "soft.img"):
        p = cli(src, other, check=2)
        assert "same file" in p.stderr
    assert digest(src) == before


def test_missing_source_and_usage(tmp_path: Path) -> None:
    p = cli(tmp_path / "nope.img", tmp_path / "dst.img", check=2)
    assert "nope.img" in p.stderr and "no such file" in p.stderr
    assert cli(check=2).returncode == 2
    assert cli(tmp_path, tmp_path / "x", check=2).returncode == 2  # a directory is not an image
    p = cli("-v", tmp_path / "nope.img", tmp_path / "dst.img", check=2)
    assert "Traceback" in p.stderr  # -v shows where


def test_verify(pair: tuple[Path, Path]) -> None:
    src, dst = pair
    poke(src, 3 * MiB, b"v" * 10)
    r = cli_json("--verify", src, dst)
    assert r["verified"] is True


def test_help_explains() -> None:
    out = cli("--help").stdout
    for word in ("--dry-run", "--json", "--undo", "--rollback", "--recover", "exit codes", "journal"):
        assert word in out


def test_library_api_and_progress(pair: tuple[Path, Path]) -> None:
    src, dst = pair
    poke(src, 0, b"lib")
    seen: list[tuple[int, int]] = []
    r = vimgtools.sync.sync(src, dst, progress=lambda done, total: seen.append((done, total)))
    assert r.changed == 1 and seen[-1] == (SIZE, SIZE)
    assert all(a <= b for (a, _), (b, _) in itertools.pairwise(seen))
    with pytest.raises(InvalidInput):
        sync(src, dst, block_size=1000)
    with pytest.raises(ImageRefused) as e:
        sync(src, src)
    assert e.value.exit_code == 2


def test_undo_and_rollback(pair: tuple[Path, Path], tmp_path: Path) -> None:
    src, dst = pair
    generation1 = digest(dst)
    poke(src, 0, os.urandom(3 * 4096))
    poke(src, 21 * MiB, bytes(64 * 1024))  # becomes a hole in dst
    undo = tmp_path / "gen1.undo"
    r = cli_json("--undo", undo, src, dst)
    assert r["undo_bytes"] > 0 and digest(dst) == digest(src)
    r = cli_json("--rollback", dst, "--undo", undo)
    assert r["rolled_back"] is True
    assert digest(dst) == generation1


def test_undo_kept_while_comparing_puts_back_every_kind_of_change(
    pair: tuple[Path, Path], tmp_path: Path
) -> None:
    """The compare keeps the replica's old bytes for the undo file as it reads them (no second read):
    runs across a piece and an 8 MiB chunk boundary, data next to zeros, a hole punched, and
    a grown source (the replica's old end reads as zeros) all come back byte for byte."""
    src, dst = pair
    generation1, size1 = digest(dst), dst.stat().st_size
    poke(src, PIECE - 56 * 1024, os.urandom(300 * 1024))  # across the first piece boundary
    poke(src, 8 * MiB - 12 * 1024, os.urandom(40 * 1024))  # across the first chunk boundary
    poke(src, 20 * MiB, os.urandom(8192) + bytes(16384) + os.urandom(4096))  # data, zeros, data
    poke(src, 60 * MiB + 4096, bytes(4096))
    with open(src, "r+b") as f:  # the guest's disk grew: the replica grows with it
        f.truncate(SIZE + 3 * MiB)
    poke(src, SIZE + MiB, os.urandom(5000))
    undo = tmp_path / "gen1.undo"
    r = cli_json("--undo", undo, src, dst)
    assert digest(dst) == digest(src) and r["undo_bytes"] > 0
    r = cli_json("--rollback", dst, "--undo", undo)
    assert r["rolled_back"] is True
    assert digest(dst) == generation1 and dst.stat().st_size == size1


def test_undo_from_the_compare_equals_the_undo_read_afterwards(tmp_path: Path) -> None:
    """The same change taken two ways: its old content given as it comes (a compare's) and read from
    the replica at the end: the undo files hold the same records."""
    from vimgtools.image import Image
    from vimgtools.journal import UNDO_MAGIC, iter_records, read_journal
    from vimgtools.sync.replica import Replica, source_of

    src = write_image(tmp_path / "src.img", SIZE, [(0, 4 * MiB)], seed=3)
    with Image(src) as img:
        source = source_of(img)
    records = []
    for with_old in (False, True):
        dst = write_image(tmp_path / f"dst-{with_old}.img", SIZE, [(0, 4 * MiB)], seed=4)
        old = dst.read_bytes()
        undo = tmp_path / f"{with_old}.undo"
        with Replica(dst, source, block_size=4096) as rep, rep.receiving(undo, with_old=with_old):
            assert rep.wants_old == with_old
            rep.data(4096, b"n" * 20000 + bytes(480), old[4096 : 4096 + 20480])
            rep.zero(MiB, 8192, old[MiB : MiB + 8192])
            rep.zero(40 * MiB, 4096, old[40 * MiB : 40 * MiB + 4096])  # a hole already: a ZERO record
            rep.end_chunk(SIZE)
        records.append(
            [(r.kind, r.offset, r.length, r.aux, p) for r, p in iter_records(read_journal(undo, UNDO_MAGIC))]
        )
    assert records[0] == records[1] and len(records[0]) == 3


def test_rollback_refuses_a_changed_replica(pair: tuple[Path, Path], tmp_path: Path) -> None:
    src, dst = pair
    poke(src, 0, b"new generation")
    undo = tmp_path / "u"
    cli("--undo", undo, src, dst)
    poke(dst, 5, b"someone wrote here")
    before = digest(dst)
    p = cli("--rollback", dst, "--undo", undo, check=2)
    assert "changed since" in p.stderr
    assert digest(dst) == before
    undo.write_bytes(b"garbage" * 100)
    p = cli("--rollback", dst, "--undo", undo, check=1)
    assert "not a vimgtools undo file" in p.stderr


def test_recover_with_nothing_to_do(pair: tuple[Path, Path]) -> None:
    _, dst = pair
    r = cli_json("--recover", dst)
    assert r["recovered"] is False


def _resident(path: Path) -> int:
    import subprocess

    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.split()[0])


def test_page_cache_left_as_found(tmp_path: Path) -> None:
    """Pages a run brought in are given back; pages that were cached before stay cached."""
    src = write_image(tmp_path / "src.img", 32 * MiB, [(0, 32 * MiB)], seed=31)
    dst = write_image(tmp_path / "dst.img", 32 * MiB, [(0, 32 * MiB)], seed=32)
    os.sync()
    for p in (src, dst):
        fd = os.open(p, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    assert _resident(src) < MiB
    cli("-n", src, dst)  # cold: what it reads, it gives back
    assert _resident(src) < 2 * MiB and _resident(dst) < 2 * MiB
    src.read_bytes()  # warm: the host had it cached; it stays cached
    cli("-n", src, dst)
    assert _resident(src) == 32 * MiB
    cli("-n", "--keep-cache", src, dst)
    assert _resident(dst) == 32 * MiB


@pytest.mark.parametrize("size", [0, 1, 4095, 5000, 8 * MiB + 1, 10_000_001])
def test_sizes_that_are_not_block_multiples(tmp_path: Path, size: int) -> None:
    """The last block of an image may be short; it is compared and written like the others."""
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(size))
    dst = tmp_path / "dst.img"
    cli(src, dst)
    assert digest(src) == digest(dst)
    if size:
        poke(src, size - 1, b"\xff" if src.read_bytes()[-1:] != b"\xff" else b"\x00")
        poke(src, 0, b"\x01" if src.read_bytes()[:1] != b"\x01" else b"\x02")
        r = cli_json(src, dst)
        assert digest(src) == digest(dst)
        assert r["changed"] == (1 if size <= 4096 else 2)
