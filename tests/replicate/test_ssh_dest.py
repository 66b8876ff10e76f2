"""DEST on the DR host over ssh (a real sshd on 127.0.0.1): a shut-off guest's qcow2 disks changed by
qemu-io between runs; only the extents their bitmaps marked are compared (at both ends) and sent;
kill -9 mid-run, --recover and --dry-run over ssh; the replica directory one whole generation."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rephelp import replicate, replicate_json, run_json
from synchelp import MiB, digest
from test_offline import bitmaps, qemu_img, qemu_io, same

pytestmark = pytest.mark.slow


@pytest.fixture
def guest(tmp_path: Path) -> tuple[Path, Path]:
    """A shut-off guest of two qcow2 disks (system and data)."""
    sysdisk, data = tmp_path / "sys.qcow2", tmp_path / "data.qcow2"
    for disk, pattern in ((sysdisk, 0x11), (data, 0x22)):
        qemu_img("create", "-q", "-f", "qcow2", disk, 64 * MiB)
        qemu_io(disk, f"write -P {pattern} 0 8M", f"write -P {pattern + 1} 40M 2M")
    return sysdisk, data


def test_first_full_then_only_the_marked_blocks_sent(
    sshd: list[str], guest: tuple[Path, Path], tmp_path: Path
) -> None:
    sysdisk, data = guest
    dest = tmp_path / "dr"
    out = run_json(*sshd, sysdisk, data, f"root@127.0.0.1:{dest}")
    assert out["generation"] == 1 and out["dest"] == f"root@127.0.0.1:{dest}"
    assert [d["mode"] for d in out["disks"]] == ["full", "full"]
    assert same(sysdisk, dest / "vda.img") and same(data, dest / "vdb.img")
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["generation"] == 1 and [d["file"] for d in manifest["disks"]] == ["vda.img", "vdb.img"]
    assert all(d["replica"] for d in manifest["disks"])  # identities taken on the DR host
    assert not (dest / ".undo").exists()
    qemu_io(sysdisk, "write -P 0x33 20M 4k", "write -z 0 64k")  # the guest ran a day
    out = run_json(*sshd, sysdisk, data, f"root@127.0.0.1:{dest}")
    vda, vdb = out["disks"]
    assert out["generation"] == 2 and [vda["mode"], vdb["mode"]] == ["incremental", "incremental"]
    # The two dirty 64 KiB clusters read at each end (the changed page once more: hashed while ssh
    # connected, read again to be sent), that page and a zero range sent.
    assert vda["bytes_read"] <= 4 * 65536 + 4096 and vdb["bytes_read"] == 0
    assert vda["bytes_written"] == 4096, vda  # the zeroed cluster is punched, not written
    assert vda["bytes_sent"] < 4096 + 32 * 1024, vda
    assert same(sysdisk, dest / "vda.img") and same(data, dest / "vdb.img")
    assert list(bitmaps(sysdisk)) == ["vimgtools.gen-2"]  # the older one went once gen 2 was durable
    assert json.loads((dest / "manifest.json").read_text())["generation"] == 2


def test_the_sessions_of_a_run_share_one_connection(
    sshd: list[str], guest: tuple[Path, Path], tmp_path: Path
) -> None:
    """prepare, one session a disk, commit: one ssh handshake (ssh runs LocalCommand once a
    connection), and the connection is gone at the end (nothing of ours left running)."""
    sysdisk, data = guest
    count = tmp_path / "connections"
    rsh = f"{sshd[1]} -o PermitLocalCommand=yes -o LocalCommand='echo c >> {count}'"
    args = ["--rsh", rsh, *sshd[2:], sysdisk, data, f"root@127.0.0.1:{tmp_path / 'dr'}"]
    for generation in (1, 2):
        count.unlink(missing_ok=True)
        assert run_json(*args)["generation"] == generation
        assert count.read_text() == "c\n"  # four sessions, one connection
        left = subprocess.run(["pgrep", "-f", str(count)], capture_output=True)
        assert left.returncode == 1, left.stdout  # its master (LocalCommand in its command line) is gone
    count.unlink()
    run_json("--rsh", f"{rsh} -o ControlMaster=no", *args[2:])
    assert count.read_text() == "c\n" * 4  # the user's own ssh options come first, and win


def test_kill_9_mid_run_then_recover_over_ssh(
    sshd: list[str], guest: tuple[Path, Path], tmp_path: Path
) -> None:
    sysdisk, data = guest
    dest = tmp_path / "dr"
    remote = f"root@127.0.0.1:{dest}"
    run_json(*sshd, sysdisk, data, remote)
    old_vdb = digest(dest / "vdb.img")
    qemu_io(data, *(f"write -P {i + 1} {i}M 1M" for i in range(60)))
    qemu_img("convert", "-U", "-O", "raw", data, tmp_path / "new-data.raw")
    new_vdb = digest(tmp_path / "new-data.raw")
    seen, killed = set(), []
    for delay in (0.4, 0.9, 1.5):
        p = subprocess.Popen(
            [sys.executable, "-m", "vimgtools.replicate", "-q", *sshd, str(sysdisk), str(data), remote]
        )
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        killed.append(p.pid)
        out, err = replicate_json(*sshd, "--recover", remote)
        assert out["dest"] == remote, err
        generation = json.loads((dest / "manifest.json").read_text())["generation"]
        seen.add((generation, bool(out["restored"])))
        want = old_vdb if generation == 1 else new_vdb  # the manifest's generation, whole
        assert digest(dest / "vdb.img") == want, f"not generation {generation} after kill -9 at {delay} s"
    print(f"\n(generation, put back) after each kill: {sorted(seen)}")
    # A killed run's shared ssh connection goes by itself (ControlPersist=10 after its last session).
    deadline = time.monotonic() + 40
    pattern = "|".join(f"/tmp/vimgtools-ssh-{pid}-" for pid in killed)
    while subprocess.run(["pgrep", "-f", pattern], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "a killed run's ssh connection is still there"
        time.sleep(0.5)
    out = run_json(*sshd, sysdisk, data, remote)
    assert same(sysdisk, dest / "vda.img") and same(data, dest / "vdb.img")
    assert out["generation"] == max(g for g, _ in seen) + 1


def test_dry_run_over_ssh_writes_nothing(sshd: list[str], guest: tuple[Path, Path], tmp_path: Path) -> None:
    sysdisk, data = guest
    dest = tmp_path / "dr"
    out = run_json("-n", *sshd, sysdisk, data, f"root@127.0.0.1:{dest}")  # a DEST still to be made
    assert out["dry_run"] and [d["mode"] for d in out["disks"]] == ["full", "full"]
    assert not dest.exists() and bitmaps(sysdisk) == {}
    run_json(*sshd, sysdisk, data, f"root@127.0.0.1:{dest}")
    qemu_io(sysdisk, "write -P 0x55 10M 4k")
    before = {p.name: digest(p) for p in dest.iterdir() if p.is_file()}
    out = run_json("-n", *sshd, sysdisk, data, f"root@127.0.0.1:{dest}")
    assert out["generation"] == 2 and out["disks"][0]["mode"] == "incremental"
    assert out["disks"][0]["changed"] == 1 and out["disks"][0]["bytes_written"] == 0
    assert {p.name: digest(p) for p in dest.iterdir() if p.is_file()} == before


def test_bad_remote_dest_is_one_line(sshd: list[str], guest: tuple[Path, Path], tmp_path: Path) -> None:
    sysdisk, _ = guest
    p = replicate(*sshd, sysdisk, f"root@127.0.0.1:{tmp_path}/no/such/dr", check=2)
    assert f"{tmp_path}/no/such/dr" in p.stderr and "does not exist" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    args = [*sshd[:2], "--remote-python", "/bin/false"]
    p = replicate(*args, sysdisk, f"root@127.0.0.1:{tmp_path}/dr", check=1)
    assert "127.0.0.1" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert bitmaps(sysdisk) == {} and not (tmp_path / "dr").exists()


def test_qcow2_replicas_over_ssh(sshd: list[str], guest: tuple[Path, Path], tmp_path: Path) -> None:
    sysdisk, data = guest
    remote = f"root@127.0.0.1:{tmp_path / 'dr'}"
    run_json(*sshd, "--format", "qcow2", sysdisk, data, remote)
    qemu_io(data, "write -P 0x77 33M 8k")
    out = run_json(*sshd, "--format", "qcow2", sysdisk, data, remote)
    assert [d["mode"] for d in out["disks"]] == ["incremental", "incremental"]
    assert out["disks"][1]["changed"] == 2
    assert same(sysdisk, tmp_path / "dr" / "vda.qcow2") and same(data, tmp_path / "dr" / "vdb.qcow2")
