"""Every failure path leaves DST as it was (or completable), with a one-line error and exit 1 or 2."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from synchelp import REMOTE, MiB, cli, digest, needs_root, poke, write_image

from vimgtools.errors import ImageError
from vimgtools.sync import sync


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    try:
        sh("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    except subprocess.CalledProcessError as e:
        pytest.skip(f"cannot mount a tmpfs here: {e.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@contextlib.contextmanager
def loop_device(backing: Path) -> Iterator[str]:
    try:
        dev = sh("losetup", "--find", "--show", str(backing))
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        pytest.skip(f"no loop device available: {e}")
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


@needs_root
def test_full_disk_leaves_dst_untouched(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "40M") as mnt:
        src = write_image(tmp_path / "src.img", 24 * MiB, [(0, 24 * MiB)], seed=1)
        dst = write_image(mnt / "dst.img", 24 * MiB, [(0, 24 * MiB)], seed=2)
        before = digest(dst)
        p = cli(src, dst, check=1)
        assert "No space left on device" in p.stderr and "vimg-journal" in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
        assert digest(dst) == before
        assert not (mnt / "dst.img.vimg-journal").exists()  # the space is given back


BLKDEBUG_EIO = """\
[inject-error]
event = "read_aio"
errno = "5"
sector = "2100"
once = "off"
"""


@contextlib.contextmanager
def failing_disk(backing: Path, mountpoint: Path, writable: bool = False) -> Iterator[Path]:
    """``backing`` exported through FUSE by qemu-storage-daemon, reads near 1 MiB failing with EIO
    (QEMU's blkdebug driver), as a dying disk would."""
    assert shutil.which("qemu-storage-daemon"), "qemu-storage-daemon missing (make installs qemu-system-x86)"
    if not Path("/dev/fuse").exists():
        pytest.skip("this machine has no /dev/fuse (the kernel offers no FUSE)")
    conf = mountpoint.with_suffix(".conf")
    conf.write_text(BLKDEBUG_EIO)
    mountpoint.touch()
    daemon = subprocess.Popen(
        [
            "qemu-storage-daemon",
            "--blockdev", f"driver=file,filename={backing},node-name=f0",
            "--blockdev", f"driver=blkdebug,image=f0,config={conf},node-name=dbg",
            "--blockdev", "driver=raw,file=dbg,node-name=r0",
            "--export", f"type=fuse,id=e0,node-name=r0,mountpoint={mountpoint},writable={'on' if writable else 'off'}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while mountpoint.stat().st_size != backing.stat().st_size:
            assert daemon.poll() is None, (
                f"qemu-storage-daemon failed: {daemon.stderr.read() if daemon.stderr else ''!r}"
            )
            assert time.monotonic() < deadline, "qemu-storage-daemon never exported the image through FUSE"
            time.sleep(0.05)
        yield mountpoint
    finally:
        daemon.terminate()
        daemon.communicate(timeout=20)
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, check=False)


@needs_root
def test_read_error_on_source(tmp_path: Path) -> None:
    backing = write_image(tmp_path / "backing.img", 4 * MiB, [(0, 4 * MiB)], seed=3)
    dst = write_image(tmp_path / "dst.img", 4 * MiB, [(0, 4 * MiB)], seed=4)
    before = digest(dst)
    with failing_disk(backing, tmp_path / "dying.img") as src:
        p = cli(src, dst, check=1)
    assert "read error at offset" in p.stderr and "Input/output error" in p.stderr
    assert str(src) in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert digest(dst) == before
    assert not (tmp_path / "dst.img.vimg-journal").exists()


@needs_root
def test_read_error_on_a_remote_replica(tmp_path: Path) -> None:
    """The receiver cannot read DST for its digests: it tells the sender, both stop, DST as it was."""
    src = write_image(tmp_path / "src.img", 4 * MiB, [(0, 4 * MiB)], seed=6)
    backing = write_image(tmp_path / "backing.img", 4 * MiB, [(0, 4 * MiB)], seed=7)
    before = digest(backing)
    with failing_disk(backing, tmp_path / "dying.img", writable=True) as dst:
        p = cli(*REMOTE, "--timeout", "60", src, f"h:{dst}", check=1, timeout=50)  # not the timeout
    assert "Input/output error" in p.stderr and str(dst) in p.stderr
    assert p.stderr.startswith("vimgtools.sync: error: h: ") and len(p.stderr.strip().splitlines()) == 1
    assert digest(backing) == before
    assert not (tmp_path / "dying.img.vimg-journal").exists()


def test_dst_vanishing_mid_sync(tmp_path: Path) -> None:
    src = write_image(tmp_path / "src.img", 64 * MiB, [(0, 64 * MiB)], seed=5)
    dst = write_image(tmp_path / "dst.img", 64 * MiB, [(0, 64 * MiB)], seed=6)

    def delete_dst(done: int, total: int) -> None:
        if dst.exists():
            dst.unlink()

    with pytest.raises(ImageError) as e:
        sync(src, dst, progress=delete_dst)
    assert "vanished" in str(e.value) and e.value.exit_code == 1
    assert not dst.exists()  # nothing recreated a half-written file under its name


@needs_root
def test_read_only_dst(tmp_path: Path) -> None:
    src = write_image(tmp_path / "src.img", 8 * MiB, [(0, 8 * MiB)], seed=7)
    dst = write_image(tmp_path / "dst.img", 8 * MiB, [(0, 8 * MiB)], seed=8)
    before = digest(dst)
    if subprocess.run(["chattr", "+i", str(dst)], capture_output=True).returncode != 0:
        pytest.skip("this filesystem has no immutable attribute (chattr +i)")
    try:
        p = cli(src, dst, check=1)
    finally:
        subprocess.run(["chattr", "-i", str(dst)], check=True)
    assert str(dst) in p.stderr and "cannot open for writing" in p.stderr
    assert digest(dst) == before


def test_unwritable_journal_directory_is_a_clean_failure(tmp_path: Path) -> None:
    src = write_image(tmp_path / "src.img", 8 * MiB, [(0, 8 * MiB)], seed=9)
    dst = write_image(tmp_path / "dst.img", 8 * MiB, [(0, 8 * MiB)], seed=10)
    before = digest(dst)
    p = cli("--journal", tmp_path / "no" / "such" / "dir" / "j", src, dst, check=1)
    assert "journal" in p.stderr
    assert digest(dst) == before


@needs_root
class TestBlockDevices:
    def test_sync_to_a_larger_device(self, tmp_path: Path) -> None:
        src = write_image(tmp_path / "src.img", 16 * MiB, [(0, 2 * MiB), (8 * MiB, MiB)], seed=11)
        backing = write_image(tmp_path / "lv.img", 24 * MiB, [(0, 24 * MiB)], seed=12)
        with loop_device(backing) as dev:
            p = cli("--json", src, dev)
            assert '"dst_extra_bytes": 8388608' in p.stdout
            with open(dev, "rb") as f:
                head = f.read(16 * MiB)
            assert head == src.read_bytes()
            poke(src, 4096, b"again")
            assert '"changed": 1' in cli("--json", src, dev).stdout
            assert not list(Path("/var/lib/vimgtools").glob("dev-*.vimg-journal"))

    def test_smaller_device_refused(self, tmp_path: Path) -> None:
        src = write_image(tmp_path / "src.img", 16 * MiB, [(0, MiB)], seed=13)
        backing = write_image(tmp_path / "lv.img", 8 * MiB, [(0, 8 * MiB)], seed=14)
        before = digest(backing)
        with loop_device(backing) as dev:
            p = cli(src, dev, check=2)
            assert "smaller than" in p.stderr and dev in p.stderr
        assert digest(backing) == before

    def test_device_as_source(self, tmp_path: Path) -> None:
        backing = write_image(tmp_path / "lv.img", 8 * MiB, [(0, 8 * MiB)], seed=15)
        dst = tmp_path / "copy.img"
        with loop_device(backing) as dev:
            cli(dev, dst)
        assert digest(dst) == digest(backing)
