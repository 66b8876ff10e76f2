"""Replicating a shut-off guest: qcow2 images changed by qemu-io between runs, dirty bitmaps started by
vimgtools, replicas checked with qemu-img compare, the manifest one whole generation."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rephelp import replicate, run_json
from synchelp import MiB, digest, qemu_holding

SIZE = 64 * MiB


def qemu_img(*args: str | Path) -> str:
    return subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True, text=True).stdout


def qemu_io(image: Path, *commands: str) -> None:
    argv = ["qemu-io", "-f", "qcow2"]
    for c in commands:
        argv += ["-c", c]
    subprocess.run([*argv, str(image)], check=True, capture_output=True)


def bitmaps(image: Path) -> dict[str, list[str]]:
    info = json.loads(qemu_img("info", "--output=json", image))
    return {b["name"]: b["flags"] for b in info["format-specific"]["data"].get("bitmaps", [])}


def same(a: Path, b: Path) -> bool:
    return subprocess.run(["qemu-img", "compare", "-q", "-U", str(a), str(b)]).returncode == 0


@pytest.fixture
def guest(tmp_path: Path) -> tuple[Path, Path]:
    """A guest of two qcow2 disks (system and data)."""
    sysdisk, data = tmp_path / "sys.qcow2", tmp_path / "data.qcow2"
    for disk, pattern in ((sysdisk, 0x11), (data, 0x22)):
        qemu_img("create", "-q", "-f", "qcow2", disk, SIZE)
        qemu_io(disk, f"write -P {pattern} 0 8M", f"write -P {pattern + 1} 40M 2M")
    return sysdisk, data


def test_first_full_then_only_what_the_bitmap_marked(guest: tuple[Path, Path], tmp_path: Path) -> None:
    sysdisk, data = guest
    dest = tmp_path / "dr"
    out = run_json(sysdisk, data, dest)
    assert out["generation"] == 1 and out["consistency"] == "offline"
    assert [d["mode"] for d in out["disks"]] == ["full", "full"]  # type: ignore[union-attr,index]
    assert same(sysdisk, dest / "vda.img") and same(data, dest / "vdb.img")
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["generation"] == 1 and manifest["guest"] == "sys"
    assert [(d["target"], d["file"], d["bitmap"]) for d in manifest["disks"]] == [
        ("vda", "vda.img", "vimgtools.gen-1"),
        ("vdb", "vdb.img", "vimgtools.gen-1"),
    ]
    assert list(bitmaps(sysdisk)) == ["vimgtools.gen-1"]
    qemu_io(sysdisk, "write -P 0x33 20M 4k", "write -z 0 64k")  # the guest ran a day
    out = run_json(sysdisk, data, dest)
    disks = out["disks"]
    assert out["generation"] == 2
    assert [d["mode"] for d in disks] == ["incremental", "incremental"]  # type: ignore[union-attr]
    # Only the two dirty 64 KiB clusters are read (from SRC and the replica), nothing of the data disk.
    assert disks[0]["bytes_read"] <= 4 * 65536 and disks[1]["bytes_read"] == 0  # type: ignore[index]
    assert disks[0]["bytes_written"] == 4096  # type: ignore[index]
    assert same(sysdisk, dest / "vda.img") and same(data, dest / "vdb.img")
    assert list(bitmaps(sysdisk)) == ["vimgtools.gen-2"]  # the older one went once gen 2 was durable


def test_an_incremental_run_loads_neither_numpy_nor_the_other_backends(
    guest: tuple[Path, Path], tmp_path: Path
) -> None:
    """numpy's import (~0.1 s) was paid by every incremental run (the undo file's zero test), the
    QMP and libvirt backends' imports (asyncio, ssl, libnbd) by every run of any kind."""
    sysdisk, data = guest
    args = f"[{str(sysdisk)!r}, {str(data)!r}], {str(tmp_path / 'dr')!r}"
    code = (
        "import subprocess, sys, vimgtools.replicate as r\n"
        f"r.replicate({args})\n"
        f"subprocess.run(['qemu-io', '-f', 'qcow2', '-c', 'write -P 0x44 1M 64k', {str(sysdisk)!r}], check=True)\n"
        f"out = r.replicate({args})\n"
        "assert [d.mode for d in out.disks] == ['incremental', 'incremental'], out\n"
        "assert out.disks[0].bytes_written == 65536, out\n"
        "loaded = [m for m in ('numpy', 'asyncio', 'qemu', 'vimgtools.replicate.libvirt') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


@pytest.mark.parametrize("lost", ["removed", "inconsistent", "resized", "replica-touched"])
def test_tracking_lost_falls_back_to_a_full_compare(
    guest: tuple[Path, Path], tmp_path: Path, lost: str
) -> None:
    sysdisk, data = guest
    dest = tmp_path / "dr"
    run_json(sysdisk, data, dest)
    qemu_io(sysdisk, "write -P 0x44 30M 4k")
    if lost == "removed":
        qemu_img("bitmap", "--remove", sysdisk, "vimgtools.gen-1")
    elif lost == "inconsistent":  # a QEMU killed with the image open leaves its bitmaps in use
        io = subprocess.Popen(
            ["qemu-io", "-f", "qcow2", str(sysdisk)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert io.stdin is not None and io.stdout is not None
        io.stdin.write(b"write -P 0x45 31M 4k\n")
        io.stdin.flush()
        io.stdout.readline()
        time.sleep(0.5)
        io.send_signal(signal.SIGKILL)
        io.communicate()
        assert "in-use" in bitmaps(sysdisk)["vimgtools.gen-1"]
    elif lost == "resized":
        qemu_img("resize", "-q", sysdisk, 2 * SIZE)
    else:
        with open(dest / "vda.img", "r+b") as f:
            f.write(b"someone else")
    p = replicate(sysdisk, data, dest)
    out = json.loads(p.stdout)
    vda, vdb = out["disks"]
    assert vda["mode"] == "rescan" and vdb["mode"] == "incremental"
    said = {
        "removed": "missing",
        "inconsistent": "inconsistent",
        "resized": "resized",
        "replica-touched": "replica",
    }
    assert said[lost] in vda["reason"] and said[lost] in p.stderr
    assert same(sysdisk, dest / "vda.img") and same(data, dest / "vdb.img")
    qemu_io(sysdisk, "write -P 0x46 50M 4k")
    out = run_json(sysdisk, data, dest)
    assert out["disks"][0]["mode"] == "incremental" and same(sysdisk, dest / "vda.img")  # type: ignore[index]


def test_kill_9_leaves_the_last_generation_whole(guest: tuple[Path, Path], tmp_path: Path) -> None:
    sysdisk, data = guest
    dest = tmp_path / "dr"
    run_json(sysdisk, data, dest)
    old_vdb = digest(dest / "vdb.img")
    qemu_io(data, *(f"write -P {i + 1} {i}M 1M" for i in range(60)))
    qemu_img("convert", "-U", "-O", "raw", data, tmp_path / "new-data.raw")
    new_vdb = digest(tmp_path / "new-data.raw")
    generations = set()
    for delay in (0.05, 0.3, 0.6, 1.0):
        p = subprocess.Popen(
            [sys.executable, "-m", "vimgtools.replicate", "-q", str(sysdisk), str(data), str(dest)]
        )
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        subprocess.run(
            [sys.executable, "-m", "vimgtools.replicate", "-q", "--recover", str(dest)], check=True
        )
        generation = json.loads((dest / "manifest.json").read_text())["generation"]
        generations.add(generation)
        want = old_vdb if generation == 1 else new_vdb  # the manifest's generation, whole
        assert digest(dest / "vdb.img") == want, f"not generation {generation} after kill -9 at {delay} s"
    out = run_json(sysdisk, data, dest)
    assert same(sysdisk, dest / "vda.img") and same(data, dest / "vdb.img")
    assert out["generation"] == max(generations) + 1


def test_dry_run_writes_nothing(guest: tuple[Path, Path], tmp_path: Path) -> None:
    sysdisk, data = guest
    before = (digest(sysdisk), digest(data))
    out = run_json("-n", sysdisk, data, tmp_path / "dr")
    assert out["dry_run"] is True and not (tmp_path / "dr").exists()
    assert (digest(sysdisk), digest(data)) == before and bitmaps(sysdisk) == {}


def test_a_running_guest_is_refused(guest: tuple[Path, Path], tmp_path: Path) -> None:
    sysdisk, data = guest
    with qemu_holding(sysdisk, "qcow2"):
        p = replicate(sysdisk, data, tmp_path / "dr", check=2)
    assert "running VM" in p.stderr and "libvirt" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "dr").exists()


def test_qcow2_replicas_and_a_raw_source(tmp_path: Path) -> None:
    raw = tmp_path / "disk.img"
    raw.write_bytes(b"\x01" * MiB + bytes(3 * MiB))
    dest = tmp_path / "dr"
    out = run_json("--format", "qcow2", raw, dest)
    assert (dest / "vda.qcow2").exists() and same(raw, dest / "vda.qcow2")
    out = run_json("--format", "qcow2", raw, dest)
    assert out["disks"][0]["mode"] == "rescan" and "raw" in out["disks"][0]["reason"]  # type: ignore[index]


def test_two_dests_of_one_guest_never_miss_a_change(guest: tuple[Path, Path], tmp_path: Path) -> None:
    """A at generation 1, then B's first run (generation 1 too): B must not restart the bitmap A reads
    from next, or A's next incremental run would miss what changed before B's run."""
    sysdisk, data = guest
    a, b = tmp_path / "dr-a", tmp_path / "dr-b"
    run_json(sysdisk, data, a)
    qemu_io(sysdisk, "write -P 0x61 5M 4k")  # after A's moment, before B's
    out = run_json(sysdisk, data, b)
    assert out["generation"] == 1 and same(sysdisk, b / "vda.img")
    qemu_io(sysdisk, "write -P 0x62 6M 4k")
    out = run_json(sysdisk, data, a)
    assert out["disks"][0]["mode"] == "rescan" and "missing" in out["disks"][0]["reason"]
    assert same(sysdisk, a / "vda.img") and same(data, a / "vdb.img")
