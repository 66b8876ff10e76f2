"""Signatures and deltas: sync through another channel, refusing anything that does not fit."""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import pytest
from synchelp import MiB, cli, cli_json, digest, poke, write_image

from vimgtools.journal import HEADER_SIZE, RECORD_SIZE


@pytest.fixture
def three(tmp_path: Path) -> tuple[Path, Path, Path]:
    """The replica (old), the source (new), and the signature of the replica."""
    old = write_image(tmp_path / "old.img", 24 * MiB, [(0, 6 * MiB), (16 * MiB, MiB)], seed=61)
    new = tmp_path / "new.img"
    shutil.copyfile(old, new)
    poke(new, 4096 * 7, os.urandom(4096 * 3))
    poke(new, MiB, bytes(64 * 1024))
    poke(new, 20 * MiB, b"into a hole")
    sig = tmp_path / "old.sig"
    cli("--signature", old, "-o", sig)
    return old, new, sig


def test_signature_delta_apply_roundtrip(three: tuple[Path, Path, Path], tmp_path: Path) -> None:
    old, new, sig = three
    assert os.path.getsize(sig) < 24 * MiB // 4096 * 16 + 8192  # 16 bytes a block
    delta = tmp_path / "d"
    r = cli_json(new, "--write-delta", delta, "--against", sig)
    assert r["changed"] == 3 + 16 + 1 and r["zero"] == 16
    assert r["delta_bytes"] == 4 * 4096  # the zero run travels as a range
    r = cli_json("--apply-delta", delta, old)
    assert digest(old) == digest(new)
    assert r["bytes_written"] == 4 * 4096


def test_delta_resizes(three: tuple[Path, Path, Path], tmp_path: Path) -> None:
    old, new, sig = three
    with open(new, "r+b") as f:
        f.truncate(30 * MiB)
    poke(new, 29 * MiB, b"tail")
    cli(new, "--write-delta", tmp_path / "d", "--against", sig)
    cli("--apply-delta", tmp_path / "d", old)
    assert digest(old) == digest(new)
    with open(new, "r+b") as f:
        f.truncate(10 * MiB)
    cli("--signature", old, "-o", sig)
    cli(new, "--write-delta", tmp_path / "d2", "--against", sig)
    cli("--apply-delta", tmp_path / "d2", old)
    assert digest(old) == digest(new) and os.path.getsize(old) == 10 * MiB


def test_delta_refused_on_other_content(three: tuple[Path, Path, Path], tmp_path: Path) -> None:
    old, new, sig = three
    delta = tmp_path / "d"
    cli(new, "--write-delta", delta, "--against", sig)
    poke(old, 5 * MiB, b"the replica changed since its signature")
    before = digest(old)
    p = cli("--apply-delta", delta, old, check=2)
    assert "other content than the image the delta was made against" in p.stderr
    assert digest(old) == before
    other = write_image(tmp_path / "other.img", 8 * MiB, [(0, MiB)])
    p = cli("--apply-delta", delta, other, check=2)
    assert "was made against an image of" in p.stderr


def _record_boundaries(delta: Path) -> list[int]:
    data = delta.read_bytes()
    pos, out = HEADER_SIZE, [0, 100, HEADER_SIZE]
    while pos + RECORD_SIZE <= len(data):
        kind = data[pos + 4]
        (length,) = struct.unpack_from("<Q", data, pos + 16)
        pos += RECORD_SIZE + (length if kind == 1 else 0)
        out += [pos - 1, pos] if pos < len(data) else [pos - 1]
    return out


def test_truncated_delta_refused_at_every_boundary(three: tuple[Path, Path, Path], tmp_path: Path) -> None:
    old, new, sig = three
    delta = tmp_path / "d"
    cli(new, "--write-delta", delta, "--against", sig)
    whole = delta.read_bytes()
    before = digest(old)
    cut = tmp_path / "cut"
    boundaries = _record_boundaries(delta)
    assert len(boundaries) > 8
    for n in boundaries:
        cut.write_bytes(whole[:n])
        p = cli("--apply-delta", cut, old, check=None)
        assert p.returncode in (1, 2), p.stderr
        assert "truncated" in p.stderr or "not a vimgtools delta" in p.stderr, p.stderr
        assert digest(old) == before, f"cut at {n} changed the image"


def test_damaged_delta_refused(three: tuple[Path, Path, Path], tmp_path: Path) -> None:
    old, new, sig = three
    delta = tmp_path / "d"
    cli(new, "--write-delta", delta, "--against", sig)
    raw = bytearray(delta.read_bytes())
    raw[HEADER_SIZE + RECORD_SIZE + 10] ^= 0x40  # inside the first payload
    delta.write_bytes(bytes(raw))
    before = digest(old)
    p = cli("--apply-delta", delta, old, check=2)
    assert "truncated or damaged delta" in p.stderr
    assert digest(old) == before


def test_signature_of_another_block_size(three: tuple[Path, Path, Path], tmp_path: Path) -> None:
    old, new, _ = three
    sig64 = tmp_path / "64k.sig"
    cli("--signature", old, "-o", sig64, "--block-size", "64K")
    p = cli(new, "--write-delta", tmp_path / "d", "--against", sig64, "--block-size", "4K", check=2)
    assert "65536-byte blocks" in p.stderr and "4096" in p.stderr
    assert not (tmp_path / "d").exists()
    r = cli_json(new, "--write-delta", tmp_path / "d", "--against", sig64)  # the signature's size is used
    assert r["changed"] == 3  # three 64 KiB blocks: the pages, the zeroed run, the hole
    cli("--apply-delta", tmp_path / "d", old)
    assert digest(old) == digest(new)


def test_damaged_signature_refused(three: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, new, sig = three
    raw = sig.read_bytes()
    sig.write_bytes(raw[:-100])
    p = cli(new, "--write-delta", tmp_path / "d", "--against", sig, check=1)
    assert "truncated or damaged signature" in p.stderr
    sig.write_bytes(raw[: HEADER_SIZE + 50] + b"\xff" + raw[HEADER_SIZE + 51 :])
    p = cli(new, "--write-delta", tmp_path / "d", "--against", sig, check=1)
    assert "signature digests damaged" in p.stderr
    assert not (tmp_path / "d").exists()
    sig.write_bytes(b"VIMGJRNL" + raw[8:])
    p = cli(new, "--write-delta", tmp_path / "d", "--against", sig, check=1)
    assert "not a vimgtools signature" in p.stderr
