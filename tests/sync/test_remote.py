"""Remote sync through a fake rsh (the far side runs here, behind a real shell command line)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from synchelp import (
    REMOTE,
    MiB,
    allocated,
    cli,
    cli_json,
    data_extents,
    digest,
    kill_far_side_mid_push,
    poke,
    write_image,
)

from vimgtools.journal import read_journal
from vimgtools.sync.ssh import split_remote
from vimgtools.sync.wire import WIRE_VERSION


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    src = write_image(tmp_path / "src.img", 48 * MiB, [(0, 8 * MiB), (24 * MiB, 4 * MiB)], seed=41)
    dst = tmp_path / "dst.img"
    cli(src, dst)
    poke(src, 4096 * 3, os.urandom(4096 * 2))
    poke(src, 25 * MiB, bytes(MiB))  # becomes a hole
    poke(src, 40 * MiB, b"new data in a hole")
    return src, dst


def test_split_remote() -> None:
    assert split_remote("host:/a b") == ("host", "/a b")
    assert split_remote("root@10.0.0.1:img") == ("root@10.0.0.1", "img")
    assert split_remote("[::1]:/x") == ("[::1]", "/x")
    assert split_remote("/local/a:b") == (None, "/local/a:b")
    assert split_remote("./a:b") == (None, "./a:b")
    assert split_remote("plain.img") == (None, "plain.img")


def test_push(pair: tuple[Path, Path]) -> None:
    src, dst = pair
    r = cli_json(*REMOTE, src, f"dr-host:{dst}")
    assert digest(src) == digest(dst)
    assert (25 * MiB, MiB) not in data_extents(dst) and allocated(dst) < allocated(src)  # punched
    assert r["changed"] == 2 + 256 + 1 and r["zero"] == 256
    assert r["bytes_written"] == 3 * 4096  # the zero run is punched
    sig_bytes = 16 * (12 * MiB // 4096 + 1)  # digests of DST's data chunks (holes travel as ranges)
    assert r["bytes_sent"] < 3 * 4096 + 64 * 1024
    assert r["bytes_received"] < 1.1 * sig_bytes + 64 * 1024


def test_pull(pair: tuple[Path, Path]) -> None:
    src, dst = pair
    r = cli_json(*REMOTE, f"dr-host:{src}", dst)
    assert digest(src) == digest(dst)
    assert r["changed"] == 2 + 256 + 1 and r["bytes_written"] == 3 * 4096
    assert r["bytes_received"] < 3 * 4096 + 64 * 1024


def test_push_creates_and_resizes(tmp_path: Path) -> None:
    src = write_image(tmp_path / "src.img", 16 * MiB, [(MiB, MiB)], seed=42)
    dst = tmp_path / "new.img"
    r = cli_json(*REMOTE, src, f"h:{dst}")
    assert r["created"] is True and digest(src) == digest(dst)
    assert data_extents(dst) == data_extents(src)
    with open(src, "r+b") as f:
        f.truncate(20 * MiB)
    r = cli_json(*REMOTE, src, f"h:{dst}")
    assert r["resized_from"] == 16 * MiB and os.path.getsize(dst) == 20 * MiB


NASTY = "we ird 'name'; touch PWNED; $(touch PWNED2) \"x\" `touch PWNED3`.img"


def test_names_with_shell_metacharacters(tmp_path: Path) -> None:
    os.chdir(tmp_path)
    src = write_image(tmp_path / NASTY, 8 * MiB, [(0, MiB)], seed=43)
    dst = tmp_path / ("copy of " + NASTY)
    cli(*REMOTE, src, f"h:{dst}")
    assert digest(src) == digest(dst)
    dst.unlink()
    cli(*REMOTE, f"h:{src}", dst)
    assert digest(src) == digest(dst)
    assert not list(tmp_path.glob("PWNED*")) and not list(Path("/").glob("PWNED*"))


def test_blake2b_checksum(pair: tuple[Path, Path]) -> None:
    src, dst = pair
    r = cli_json(*REMOTE, "--checksum", "blake2b", src, f"h:{dst}")
    assert digest(src) == digest(dst) and r["changed"] == 259


def test_refusal_on_the_far_side_keeps_its_exit_code(pair: tuple[Path, Path], tmp_path: Path) -> None:
    src, dst = pair
    small = write_image(tmp_path / "small.img", MiB, [(0, MiB)])
    before = digest(dst)
    p = cli(*REMOTE, small, f"h:{dst}", check=2)
    assert "h: " in p.stderr and "--allow-shrink" in p.stderr
    assert digest(dst) == before
    p = cli(*REMOTE, src, "h:/no/such/dir/x.img", check=2)
    assert "does not exist" in p.stderr


def test_dry_run_remote(pair: tuple[Path, Path]) -> None:
    src, dst = pair
    before = digest(dst)
    r = cli_json(*REMOTE, "-n", src, f"h:{dst}")
    assert r["changed"] == 259 and r["bytes_written"] == 0
    assert digest(dst) == before


def test_missing_vimgtools_on_the_far_side(pair: tuple[Path, Path], tmp_path: Path) -> None:
    src, dst = pair
    bare = tmp_path / "bare-python"
    bare.write_text(f'#!/bin/sh\nexec {sys.executable} -I -S "$@"\n')  # no site-packages: no vimgtools
    bare.chmod(0o755)
    p = cli("--rsh", REMOTE[1], "--remote-python", bare, src, f"far:{dst}", check=1)
    assert "far: vimgtools is not installed" in p.stderr


def test_silent_peer_times_out(pair: tuple[Path, Path], tmp_path: Path) -> None:
    src, dst = pair
    hang = tmp_path / "hang-python"
    hang.write_text("#!/bin/sh\nexec sleep 60\n")
    hang.chmod(0o755)
    t0 = time.monotonic()
    p = cli("--rsh", REMOTE[1], "--remote-python", hang, "--timeout", "2", src, f"far:{dst}", check=1)
    assert "no data for 2 s" in p.stderr
    assert time.monotonic() - t0 < 30


def test_both_remote_is_usage_error(tmp_path: Path) -> None:
    p = cli(*REMOTE, "a:/x", "b:/y", check=2)
    assert "both are remote" in p.stderr
    p = cli(*REMOTE, "--", "-oProxyCommand=x:/y", tmp_path / "z", check=2)
    assert "cannot start with '-'" in p.stderr


@pytest.mark.slow
def test_far_side_killed_mid_stream(tmp_path: Path) -> None:
    """kill -9 of the receiving server: the replica stays old or is recoverable, the next run resumes."""
    size = 160 * MiB
    old = write_image(tmp_path / "old.img", size, [(0, size)], seed=44)
    src = write_image(tmp_path / "src.img", size, [(0, size)], seed=45)
    old_sum, new_sum = digest(old), digest(src)
    dst = tmp_path / "dst.img"
    pidfile = tmp_path / "pid"
    journal = tmp_path / "dst.img.vimg-journal"
    for _ in range(3):
        dst.write_bytes(old.read_bytes())
        err = kill_far_side_mid_push(src, f"h:{dst}", journal=journal, pidfile=pidfile)
        assert b"h: connection closed" in err
        assert journal.exists() and not read_journal(journal).committed
        assert digest(dst) == old_sum
        r = cli_json(*REMOTE, src, f"h:{dst}")
        assert r["resumed_from"] > 0
        assert digest(dst) == new_sum
        return
    raise AssertionError("unreachable")


def _server(tmp_path: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "vimgtools.sync", "--server", "--timeout", "10"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )


def _hello(dst: Path, size: int, version: int = WIRE_VERSION) -> dict[str, object]:
    return {
        "magic": "VIMGSYNC",
        "version": version,
        "role": "receiver",
        "path": str(dst),
        "block_size": 4096,
        "chunk_size": 8 * MiB,
        "checksum": "xxh128",
        "key": "00" * 32,
        "options": {},
        "source": {"size": size, "identity": [1, 2, 3], "token": "x", "mode": 0o600},
    }


@pytest.mark.parametrize("attack", ["outside-chunk", "past-end", "huge-frame", "bad-version", "garbage"])
def test_hostile_sender_is_refused(tmp_path: Path, attack: str) -> None:
    from vimgtools.sync.wire import DATA, ERROR, HELLO, OFFSET, READY, Channel

    dst = write_image(tmp_path / "dst.img", 16 * MiB, [(0, 16 * MiB)], seed=46)
    before = digest(dst)
    srv = _server(tmp_path)
    assert srv.stdin is not None and srv.stdout is not None
    ch = Channel(srv.stdout.fileno(), srv.stdin.fileno(), peer="server", timeout=20)
    ch.send_json(HELLO, _hello(dst, 16 * MiB, version=99 if attack == "bad-version" else WIRE_VERSION))
    if attack != "bad-version":
        ch.recv(READY)
        if attack == "outside-chunk":
            ch.send(DATA, OFFSET.pack(9 * MiB), b"x" * 4096)  # chunk 0 is [0, 8 MiB)
        elif attack == "past-end":
            ch.send(DATA, OFFSET.pack(2**62), b"x" * 4096)
        elif attack == "huge-frame":
            srv.stdin.write(b"VS" + bytes([DATA, 0]) + (2**31).to_bytes(4, "little"))
            srv.stdin.flush()
        else:
            srv.stdin.write(b"\x00" * 64)
            srv.stdin.flush()
    ftype, payload = ch.recv(ERROR, 4, 5)  # the digests may come first
    while ftype != ERROR:
        ftype, payload = ch.recv(ERROR, 4, 5)
    message = json.loads(bytes(payload))["message"]
    expected = {
        "outside-chunk": "outside the chunk",
        "past-end": "outside the chunk",
        "huge-frame": "refused a frame of 2147483648 bytes",
        "bad-version": "wire version 99",
        "garbage": "garbage on the wire",
    }[attack]
    assert expected in message
    srv.stdin.close()
    assert srv.wait(timeout=20) == 1
    srv.stdout.close()
    assert digest(dst) == before


def test_push_onto_itself_is_refused(pair: tuple[Path, Path]) -> None:
    src, _ = pair
    before = digest(src)
    p = cli(*REMOTE, src, f"localhost:{src}", check=2)
    assert "same file" in p.stderr
    assert digest(src) == before


@pytest.mark.parametrize("size", [0, 5000, 10_000_001])
def test_remote_sizes_that_are_not_block_multiples(tmp_path: Path, size: int) -> None:
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(size))
    dst = tmp_path / "dst.img"
    cli(*REMOTE, src, f"h:{dst}")
    assert digest(src) == digest(dst)
    if size:
        poke(src, size - 1, b"\xff" if src.read_bytes()[-1:] != b"\xff" else b"\x00")
        cli(*REMOTE, f"h:{src}", dst)
        assert digest(src) == digest(dst)
