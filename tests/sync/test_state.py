"""--state: the next run reads SRC alone, unless the replica was touched in between."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from synchelp import REMOTE, MiB, cli, cli_json, digest, kill_far_side_mid_push, poke, write_image

SIZE = 32 * MiB


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path, Path]:
    src = write_image(tmp_path / "src.img", SIZE, [(0, 12 * MiB), (20 * MiB, 4 * MiB)], seed=71)
    dst = tmp_path / "dst.img"
    state = tmp_path / "src.state"
    r = cli_json("--state", state, src, dst)
    assert r["state"] == "none yet" and state.exists()
    return src, dst, state


def test_second_run_reads_src_alone(setup: tuple[Path, Path, Path]) -> None:
    src, dst, state = setup
    poke(src, 3 * 4096, os.urandom(4096))
    poke(src, 21 * MiB, bytes(8192))
    r = cli_json("--state", state, src, dst)
    assert r["state"] == "trusted"
    assert r["bytes_read"] <= 16 * MiB  # SRC's data only; the replica was not read
    assert r["changed"] == 3 and r["zero"] == 2
    assert digest(src) == digest(dst)
    r = cli_json("--state", state, src, dst)  # and again: nothing changed
    assert r["state"] == "trusted" and r["changed"] == 0


def test_touched_replica_is_compared_in_full(setup: tuple[Path, Path, Path]) -> None:
    src, dst, state = setup
    poke(dst, 5 * MiB, b"the replica was mounted and written")
    r = cli_json("--state", state, src, dst)
    assert r["state"] == "replica changed since"
    assert digest(src) == digest(dst)
    assert cli_json("--state", state, src, dst)["state"] == "trusted"


def test_replaced_replica_is_compared_in_full(setup: tuple[Path, Path, Path], tmp_path: Path) -> None:
    src, dst, state = setup
    shutil.copyfile(dst, tmp_path / "other")
    poke(tmp_path / "other", 0, b"x")
    os.replace(tmp_path / "other", dst)  # same path, another inode
    r = cli_json("--state", state, src, dst)
    assert r["state"] == "replica changed since" and digest(src) == digest(dst)


def test_damaged_state_is_not_trusted(setup: tuple[Path, Path, Path]) -> None:
    src, dst, state = setup
    raw = bytearray(state.read_bytes())
    raw[4096 + 40] ^= 1
    state.write_bytes(bytes(raw))
    poke(src, 0, b"change")
    p = cli("--json", "--state", state, src, dst)
    assert "damaged" in p.stderr
    assert digest(src) == digest(dst)


def test_remote_push_with_state(setup: tuple[Path, Path, Path], tmp_path: Path) -> None:
    src, dst, state = setup
    poke(src, 22 * MiB, os.urandom(4096))
    r = cli_json(*REMOTE, "--state", state, src, f"h:{dst}")
    assert r["state"] == "trusted"
    assert r["bytes_received"] < 4096  # no digests came back: only the handshake and the result
    assert r["bytes_sent"] < 4096 + 4096
    assert digest(src) == digest(dst)


def test_state_with_pull_is_refused(setup: tuple[Path, Path, Path]) -> None:
    src, dst, state = setup
    p = cli(*REMOTE, "--state", state, f"h:{src}", dst, check=2)
    assert "--state" in p.stderr


def test_dry_run_keeps_the_state(setup: tuple[Path, Path, Path]) -> None:
    src, dst, state = setup
    before = state.read_bytes()
    poke(src, 0, b"dry")
    r = cli_json("-n", "--state", state, src, dst)
    assert r["changed"] == 1 and state.read_bytes() == before


def test_remote_push_with_state_of_a_touched_replica(setup: tuple[Path, Path, Path]) -> None:
    """The sender compares with the state while ssh connects; told the replica changed, it starts over."""
    src, dst, state = setup
    poke(src, 2 * MiB, os.urandom(4096))
    poke(dst, 5 * MiB, b"the replica was mounted and written")
    r = cli_json(*REMOTE, "--state", state, src, f"h:{dst}")
    assert r["state"] == "replica changed since"
    assert r["changed"] == 2 and r["bytes_received"] > 16 * MiB // 4096 * 16  # digests of DST's data came
    assert digest(src) == digest(dst)
    assert cli_json(*REMOTE, "--state", state, src, f"h:{dst}")["state"] == "trusted"


@pytest.mark.slow
def test_remote_push_with_state_resumes(tmp_path: Path) -> None:
    """Far side killed mid-stream; the next --state run resumes with the state still trusted."""
    size = 160 * MiB
    src = write_image(tmp_path / "src.img", size, [(0, size)], seed=72)
    dst, state, pidfile = tmp_path / "dst.img", tmp_path / "src.state", tmp_path / "pid"
    journal = tmp_path / "dst.img.vimg-journal"
    cli_json("--state", state, src, dst)
    old_sum = digest(dst)
    src.write_bytes(os.urandom(size))  # same inode, all new
    kill_far_side_mid_push("--state", state, src, f"h:{dst}", journal=journal, pidfile=pidfile)
    assert digest(dst) == old_sum
    r = cli_json(*REMOTE, "--state", state, src, f"h:{dst}")
    assert r["resumed_from"] > 0 and r["state"] == "trusted"
    assert digest(dst) == digest(src)
    r = cli_json(*REMOTE, "--state", state, src, f"h:{dst}")  # the state written after the resume is right
    assert r["state"] == "trusted" and r["changed"] == 0
