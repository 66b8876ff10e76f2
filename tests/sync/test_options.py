"""The options contract of ``python -m vimgtools.sync``: each option works in every mode that takes it,
or is refused (exit 2, naming option and mode); ``-n`` writes nothing in any mode; SRC/DST that are
not files or block devices are refused at once; ``--verify`` checks a remote replica too."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from synchelp import REMOTE, MiB, cli, cli_json, digest, poke, write_image

from vimgtools.image import Image
from vimgtools.journal import JOURNAL_MAGIC, Header, JournalWriter, journal_path_for

SIZE = 24 * MiB


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    src = write_image(tmp_path / "src.img", SIZE, [(0, 3 * MiB), (9 * MiB, 5 * MiB)], seed=1)
    dst = tmp_path / "dst.img"
    cli(src, dst)
    poke(src, 10 * MiB, b"changed")
    return src, dst


def snapshot(directory: Path) -> dict[str, str]:
    """Every file in ``directory`` and its sha256: proves that nothing was written or created."""
    return {p.name: digest(p) for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rollback", "{dst}", "--undo", "{tmp}/u", "--verify"], "--verify does not apply to --rollback"),
        (["--recover", "{dst}", "--undo", "{tmp}/u"], "--undo does not apply to --recover"),
        (["--recover", "{dst}", "--rollback", "{dst}"], "two modes"),
        (["--signature", "{src}", "-o", "{tmp}/s", "--force"], "--force does not apply to --signature"),
        (["--apply-delta", "{tmp}/d", "{dst}", "--verify"], "--verify does not apply to --apply-delta"),
        (
            ["--write-delta", "{tmp}/d", "{src}", "--against", "{tmp}/s", "--undo", "{tmp}/u"],
            "--undo does not",
        ),
        (["{src}", "{dst}", "--against", "{tmp}/s"], "--against does not apply to SRC DST"),
        (["{src}", "{dst}", "--rsh", "ssh -p 2222"], "--rsh applies only when SRC or DST is"),
        (["{src}", "{dst}", "--timeout", "5"], "--timeout applies only when"),
        (["{src}", "{dst}", "--checksum", "blake2b"], "--checksum applies only to a remote sync or --state"),
    ],
)
def test_an_option_a_mode_does_not_take_is_refused(
    pair: tuple[Path, Path], tmp_path: Path, args: list[str], message: str
) -> None:
    src, dst = pair
    before = snapshot(tmp_path)
    argv = [a.format(src=src, dst=dst, tmp=tmp_path) for a in args]
    p = cli(*argv, check=2)
    assert message in p.stderr
    assert snapshot(tmp_path) == before


def test_library_errors_are_worded_as_flags_by_the_cli(pair: tuple[Path, Path]) -> None:
    src, dst = pair
    p = cli("--block-size", "3000", src, dst, check=2)
    assert "error: --block-size: " in p.stderr and "block_size" not in p.stderr


def test_dry_run_of_a_rollback_checks_and_writes_nothing(pair: tuple[Path, Path], tmp_path: Path) -> None:
    src, dst = pair
    undo = tmp_path / "u.undo"
    cli("--undo", undo, src, dst)
    before = snapshot(tmp_path)
    out = cli_json("-n", "--rollback", dst, "--undo", undo)
    assert out["dry_run"] is True and out["rolled_back"] is False and out["would_write"] == 4096
    assert snapshot(tmp_path) == before
    poke(dst, 10 * MiB, b"touched")  # the replica no longer holds what that sync wrote
    before = snapshot(tmp_path)
    p = cli("-n", "--rollback", dst, "--undo", undo, check=2)
    assert "changed since the sync" in p.stderr
    assert snapshot(tmp_path) == before


def test_dry_run_of_a_recovery_writes_nothing(pair: tuple[Path, Path], tmp_path: Path) -> None:
    _, dst = pair
    with Image(dst) as img:
        jpath = journal_path_for(img)
        w = JournalWriter(jpath, Header(JOURNAL_MAGIC, 4096, img.size, img.size))
    w.data(0, b"x" * 4096)
    w.commit()
    w.close()
    before = snapshot(tmp_path)
    out = cli_json("-n", "--recover", dst)
    assert out["dry_run"] is True and out["recovered"] is False and out["would_write"] == 4096
    assert snapshot(tmp_path) == before
    assert cli_json("--recover", dst)["bytes_written"] == 4096  # the real one does write
    assert dst.read_bytes()[:4096] == b"x" * 4096


def test_dry_run_of_signature_and_delta_modes_writes_nothing(pair: tuple[Path, Path], tmp_path: Path) -> None:
    src, dst = pair
    sig, delta = tmp_path / "dst.sig", tmp_path / "d.delta"
    before = snapshot(tmp_path)
    out = cli_json("-n", "--signature", dst, "-o", sig)
    assert out["dry_run"] is True and out["blocks"] == SIZE // 4096
    assert snapshot(tmp_path) == before
    cli("--signature", dst, "-o", sig)
    before = snapshot(tmp_path)
    out = cli_json("-n", src, "--write-delta", delta, "--against", sig)
    assert out["changed"] == 1 and out["delta_bytes"] == 4096
    assert snapshot(tmp_path) == before
    cli(src, "--write-delta", delta, "--against", sig)
    before = snapshot(tmp_path)
    out = cli_json("-n", "--apply-delta", delta, dst)
    assert out["dry_run"] is True and out["changed"] == 1 and out["bytes_written"] == 0
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("where", ["src", "dst", "delta", "undo"])
def test_a_fifo_is_refused_at_once(pair: tuple[Path, Path], tmp_path: Path, where: str) -> None:
    src, dst = pair
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    argv = {
        "src": [fifo, dst],
        "dst": [src, fifo],
        "delta": ["--apply-delta", fifo, dst],
        "undo": ["--rollback", dst, "--undo", fifo],
    }[where]
    before = digest(dst)
    t0 = time.monotonic()
    p = cli(*argv, check=None, timeout=30)
    assert time.monotonic() - t0 < 20  # refused, not waited on
    assert p.returncode == 2, p.stderr
    assert "FIFO" in p.stderr and str(fifo) in p.stderr
    assert digest(dst) == before


def test_a_character_device_is_refused(pair: tuple[Path, Path]) -> None:
    src, _ = pair
    p = cli("/dev/zero", src, check=2)
    assert "character device" in p.stderr


@pytest.mark.parametrize("direction", ["push", "pull"])
def test_verify_reads_a_remote_replica_back(pair: tuple[Path, Path], direction: str) -> None:
    src, dst = pair
    args = [src, f"h:{dst}"] if direction == "push" else [f"h:{src}", dst]
    out = cli_json(*REMOTE, "--verify", *args)
    assert out["verified"] is True
    assert out["changed"] == 1
    assert digest(src) == digest(dst)
    out = cli_json(*REMOTE, "--verify", "-n", *args)  # a dry run has nothing to verify
    assert out["verified"] is None


def test_workers_reach_every_mode(pair: tuple[Path, Path], tmp_path: Path) -> None:
    """``workers`` is used by the local compare, --state and a push (one thread still gives the same result)."""
    from vimgtools.sync import SyncOptions, sync

    src, dst = pair
    state = tmp_path / "s.state"
    for opts in (SyncOptions(workers=1), SyncOptions(workers=1, state=str(state))):
        r = sync(src, dst, opts)
        assert digest(src) == digest(dst), r
    fake_rsh, remote_python = REMOTE[1], REMOTE[3]
    poke(src, 0, b"w")
    r = sync(src, f"h:{dst}", SyncOptions(workers=1, rsh=fake_rsh, remote_python=remote_python, verify=True))
    assert r.changed == 1 and r.verified is True
    with pytest.raises(ValueError, match="workers"):
        SyncOptions(workers=0)
    assert json.loads(json.dumps(SyncOptions().for_peer()))["workers"] == 2
