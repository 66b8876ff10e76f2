"""Any image format as SRC or DST, through NBD: real images made by qemu-img, changed by qemu-io,
every result checked with ``qemu-img compare``; bad input refused with nothing written; no
qemu-storage-daemon of ours left behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from synchelp import REMOTE, MiB, cli, cli_json, digest, qemu_holding, write_image

from vimgtools.image import Image
from vimgtools.journal import committed_journal

SIZE = 64 * MiB


def qemu_img(*args: str | Path) -> str:
    return subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True, text=True).stdout


def qemu_io(image: Path, *commands: str, fmt: str = "qcow2") -> None:
    argv = ["qemu-io", "-f", fmt]
    for c in commands:
        argv += ["-c", c]
    subprocess.run([*argv, str(image)], check=True, capture_output=True)


def same(a: Path, b: Path) -> bool:
    """The guest sees the same bytes in both (qemu-img compare probes each: our files are named right)."""
    return subprocess.run(["qemu-img", "compare", "-q", "-U", str(a), str(b)]).returncode == 0


def ours(tmp: Path) -> list[str]:
    """vimgtools' qemu-storage-daemons serving this test's images (other tests run beside it)."""
    out = subprocess.run(["pgrep", "-af", "qemu-storage-daemon"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "vimgtools-" in line and str(tmp) in line]


@pytest.fixture(autouse=True)
def nothing_left_running(tmp_path: Path) -> Iterator[None]:
    yield
    deadline = time.monotonic() + 10
    while ours(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not ours(tmp_path), "a qemu-storage-daemon of vimgtools outlived its run"


@pytest.fixture
def chain(tmp_path: Path) -> tuple[Path, Path]:
    """A qcow2 overlay on a qcow2 base (the guest's view spans both), and its raw replica."""
    base, top = tmp_path / "base.qcow2", tmp_path / "mail.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, SIZE)
    qemu_io(base, "write -P 0x11 0 8M", "write -P 0x12 40M 1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top)
    qemu_io(top, "write -P 0x21 4M 64k", "write -P 0x22 20M 4k")
    return top, tmp_path / "mail.img"


def test_qcow2_with_backing_file_into_raw_then_only_changes(chain: tuple[Path, Path]) -> None:
    src, dst = chain
    out = cli_json(src, dst)
    assert same(src, dst)
    assert out["src_format"] == "qcow2" and out["dst_format"] == "raw"
    assert [Path(c["filename"]).name for c in out["src_chain"]] == ["mail.qcow2", "base.qcow2"]  # type: ignore[union-attr,index]
    assert out["bytes_read"] < 12 * MiB  # holes and unallocated clusters are never read
    qemu_io(src, "write -P 0x31 30M 4k", "write -z 40M 64k")  # a change and a zeroed range
    out = cli_json(src, dst)
    assert same(src, dst)
    assert out["changed"] == 1 + 16 and out["zero"] == 16 and out["bytes_written"] == 4096
    p = cli("-v", src, dst)
    assert "base.qcow2" in p.stderr  # -v shows the chain


def test_into_a_new_qcow2_replica_sparse_with_the_sources_cluster_size(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.qcow2", tmp_path / "dst.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=131072", src, SIZE)
    qemu_io(src, "write -P 0x41 0 2M", "write -P 0x42 50M 128k")
    out = cli_json(src, dst)
    assert out["created"] is True and out["dst_format"] == "qcow2"
    info = json.loads(qemu_img("info", "--output=json", dst))
    assert info["format"] == "qcow2" and info["virtual-size"] == SIZE and info["cluster-size"] == 131072
    assert same(src, dst)
    assert os.stat(dst).st_blocks * 512 < 8 * MiB  # only what the guest wrote is allocated
    qemu_io(src, "write -z 0 2M")  # zeroed in the source: deallocated or zero clusters in the replica
    cli(src, dst)
    assert same(src, dst)
    data = [e for e in json.loads(qemu_img("map", "--output=json", dst)) if e["data"]]
    assert all(e["start"] >= 2 * MiB for e in data), data
    before = digest(dst)
    qemu_io(src, "write -P 0x43 1M 4k")
    out = cli_json("-n", src, dst)
    assert out["changed"] == 1 and digest(dst) == before  # -n writes nothing into a qcow2 either


@pytest.mark.parametrize("kind", ["compressed", "discarded", "vmdk"])
def test_other_shapes_of_source(tmp_path: Path, kind: str) -> None:
    plain = tmp_path / "plain.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", plain, SIZE)
    qemu_io(plain, "write -P 0x51 0 4M", "write -P 0x52 30M 4M")
    if kind == "compressed":
        src = tmp_path / "c.qcow2"
        qemu_img("convert", "-c", "-O", "qcow2", plain, src)
    elif kind == "discarded":
        src = plain
        qemu_io(src, "discard 30M 2M")
    else:
        src = tmp_path / "disk.vmdk"
        qemu_img("convert", "-O", "vmdk", plain, src)
    dst = tmp_path / "r.img"
    write_image(dst, SIZE, [(0, SIZE)], seed=5)  # an old replica full of other data
    cli(src, dst)
    assert same(src, dst)


def test_raw_source_into_an_existing_vmdk(tmp_path: Path) -> None:
    src = write_image(tmp_path / "src.img", SIZE, [(0, 3 * MiB), (33 * MiB, MiB)], seed=6)
    dst = tmp_path / "r.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", dst, SIZE)
    out = cli_json(src, dst)
    assert out["dst_format"] == "vmdk" and same(src, dst)


def test_formats_given_are_never_probed(tmp_path: Path) -> None:
    """A raw guest disk whose guest wrote a qcow2 header: raw when said so, refused when not."""
    disk = tmp_path / "guest.img"
    hdr = tmp_path / "h.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", hdr, SIZE)
    write_image(disk, SIZE, [(MiB, MiB)], seed=7)
    with open(disk, "r+b") as f:
        f.write(hdr.read_bytes()[:4096])  # the guest wrote a qcow2 header at its start
    p = cli(disk, tmp_path / "r.img", check=2)
    assert (
        "looks like a qcow2 image" in p.stderr and str(disk) in p.stderr and len(p.stderr.splitlines()) == 1
    )
    assert not (tmp_path / "r.img").exists()
    cli("--src-format", "raw", disk, tmp_path / "r.img")
    assert digest(disk) == digest(tmp_path / "r.img")  # copied byte for byte, header and all
    p = cli("--src-format", "qcow3", disk, tmp_path / "r.img", check=2)
    assert "--src-format: 'qcow3': not a format qemu-img knows" in p.stderr


def _zero_refcount_block(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(48)
        (table,) = struct.unpack(">Q", f.read(8))
        f.seek(table)
        (block,) = struct.unpack(">Q", f.read(8))
        f.seek(block)
        f.write(bytes(65536))


@pytest.mark.parametrize("bad", ["truncated", "refcounts", "encrypted", "no-backing", "bigger-dst"])
def test_bad_images_are_refused_with_nothing_written(tmp_path: Path, bad: str) -> None:
    src = tmp_path / "src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", src, SIZE)
    qemu_io(src, "write -P 0x61 0 1M")
    dst = write_image(tmp_path / "dst.img", SIZE, [(0, MiB)], seed=8)
    args: list[str | Path] = [src, dst]
    if bad == "truncated":
        os.truncate(src, 100)
    elif bad == "refcounts":
        _zero_refcount_block(src)
    elif bad == "encrypted":
        src.unlink()
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "--object", "secret,id=s0,data=pw",
             "-o", "encrypt.format=luks,encrypt.key-secret=s0", str(src), str(SIZE)],
            check=True,
        )  # fmt: skip
    elif bad == "no-backing":
        base = tmp_path / "base.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", base, SIZE)
        src.unlink()
        qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", src)
        base.unlink()
    else:
        dst = tmp_path / "dst.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", dst, 2 * SIZE)
        args = [src, dst]
    before = digest(dst)
    p = cli(*args, check=2)
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    expected = {
        "truncated": str(src),
        "refcounts": "corruptions",
        "encrypted": "encrypted",
        "no-backing": "base.qcow2",
        "bigger-dst": "--allow-shrink",
    }[bad]
    assert expected in p.stderr
    assert digest(dst) == before
    assert not list(tmp_path.glob("*.vimg-*"))


def test_a_qcow2_replica_grows_with_its_source(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.qcow2", tmp_path / "dst.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", src, SIZE)
    qemu_io(src, "write -P 0x71 0 1M")
    cli(src, dst)
    qemu_img("resize", "-q", src, 2 * SIZE)
    qemu_io(src, "write -P 0x72 100M 64k")
    out = cli_json(src, dst)
    assert out["resized_from"] == SIZE
    assert json.loads(qemu_img("info", "--output=json", dst))["virtual-size"] == 2 * SIZE
    assert same(src, dst)


@pytest.mark.slow
def test_kill_9_into_a_qcow2_then_recover(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.qcow2", tmp_path / "dst.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", src, 4 * SIZE)
    qemu_io(src, *(f"write -P {i % 250 + 1} {i * 2}M 1M" for i in range(120)))
    cli(src, dst)
    old = tmp_path / "old.qcow2"
    shutil.copyfile(dst, old)
    qemu_io(src, *(f"write -P {i % 250 + 3} {i * 2}M 512k" for i in range(120)))
    t0 = time.monotonic()
    cli(src, dst)
    full = time.monotonic() - t0
    states: set[str] = set()
    for k in range(1, 12):
        shutil.copyfile(old, dst)
        p = subprocess.Popen(
            [sys.executable, "-m", "vimgtools.sync", "-q", str(src), str(dst)], stderr=subprocess.DEVNULL
        )
        time.sleep(full * k / 12)
        p.send_signal(signal.SIGKILL)
        p.wait()
        _until_unlocked(dst)
        j = dst.with_name(dst.name + ".vimg-journal")
        states.add("committed" if committed_journal(j) is not None else "other")
        cli("--recover", dst)
        assert same(dst, old) or same(dst, src), f"a mix after kill -9 at {full * k / 12:.2f} s"
        cli(src, dst)
        assert same(dst, src)
    assert states, "never killed"


def _until_unlocked(path: Path, timeout: float = 30) -> None:
    """The killed run's qemu-storage-daemon gets SIGKILL when its parent dies (PR_SET_PDEATHSIG),
    and lets go of the image's locks a moment later (under load, after the next run had started:
    "a running VM holds this image open"). Wait for that, as a user retrying would."""
    deadline = time.monotonic() + timeout
    with Image(path) as img:
        while img.qemu_lock() is not None:
            assert time.monotonic() < deadline, f"{path}: still locked {timeout} s after the kill"
            time.sleep(0.05)


@pytest.mark.parametrize("direction", ["push", "pull"])
def test_qcow2_on_both_ends_over_a_remote_shell(tmp_path: Path, direction: str) -> None:
    src, dst = tmp_path / "src.qcow2", tmp_path / "dst.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", src, SIZE)
    qemu_io(src, "write -P 0x81 0 3M", "write -P 0x82 60M 4k")
    args = [src, f"h:{dst}"] if direction == "push" else [f"h:{src}", dst]
    out = cli_json(*REMOTE, "--verify", *args)
    assert out["src_format"] == "qcow2" and out["dst_format"] == "qcow2" and out["verified"] is True
    assert same(src, dst)
    qemu_io(src, "write -P 0x83 10M 4k")
    out = cli_json(*REMOTE, *args)
    assert out["changed"] == 1 and same(src, dst)


@pytest.fixture
def running_vm(tmp_path: Path) -> Iterator[Path]:
    """A real (paused, TCG) qemu-system-x86_64 with a qcow2 virtio disk."""
    disk = tmp_path / "vm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", disk, SIZE)
    qemu_io(disk, "write -P 0x91 0 2M")
    with qemu_holding(disk, "qcow2"):
        yield disk


def test_a_qcow2_held_by_qemu(running_vm: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.img"
    p = cli("--json", running_vm, copy)  # read through a force-share export, with the warning
    assert "crash-consistent" in p.stderr
    assert same(running_vm, copy)
    src = tmp_path / "new.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", src, SIZE)
    before = digest(running_vm)
    p = cli(src, running_vm, check=2)
    assert "running VM" in p.stderr and "--force" in p.stderr
    assert digest(running_vm) == before


def test_state_undo_and_rollback_with_qcow2_on_both_ends(tmp_path: Path) -> None:
    src, dst, state, undo = (tmp_path / n for n in ("src.qcow2", "dst.qcow2", "s.state", "u.undo"))
    qemu_img("create", "-q", "-f", "qcow2", src, SIZE)
    qemu_io(src, "write -P 0xa1 0 2M")
    assert cli_json("--state", state, src, dst)["state"] == "none yet"
    old = tmp_path / "old.qcow2"
    shutil.copyfile(dst, old)
    qemu_io(src, "write -P 0xa2 30M 4k")
    out = cli_json("--state", state, "--undo", undo, src, dst)
    assert (
        out["state"] == "trusted" and out["changed"] == 1
    )  # the replica is as the state says: SRC alone read
    assert same(src, dst)
    cli("--rollback", dst, "--undo", undo)
    assert same(dst, old)
