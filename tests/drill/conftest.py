"""Fixtures of the drill tests: replicas copied from the cached rekernel test guests, each broken its own way.

The guests (tests/rekernel/guestbuild.py) boot Debian 12 with ``quiet`` on the kernel command line,
a one-shot unit that prints ``VIMG-...`` lines on ttyS0 and powers off, and no getty on ttyS0.
Variants are made on sparse copies by loop-mounting the root partition (root needed): a getty and a
non-quiet kernel (the login-prompt case), a zeroed MBR, a broken fstab. Each copy is made once per
session and only ever read by the drills, so tests share them; every test checks their sha256.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "rekernel"))

import guestbuild
import qemuboot
from drillhelp import qemus_under

ROOT_OFFSET = 2048 * 512  # guestbuild's partition 1 starts at sector 2048


@contextlib.contextmanager
def mounted_root(image: Path, where: Path) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-o", f"loop,offset={ROOT_OFFSET}", str(image), str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


@pytest.fixture(scope="session")
def base_image() -> Path:
    if os.geteuid() != 0:
        pytest.skip("the drill boot tests need root (the guests are built with debootstrap and loop mounts)")
    return guestbuild.guest_image("grub2")


@pytest.fixture(scope="session")
def guest_version() -> str:
    return guestbuild.guest_kernel_version(guestbuild.debootstrap_tree())


@pytest.fixture(scope="session")
def make_replica(
    tmp_path_factory: pytest.TempPathFactory, base_image: Path
) -> Callable[[str, Callable[[Path], None] | None], Path]:
    made: dict[str, Path] = {}

    def make(name: str, edit: Callable[[Path], None] | None = None) -> Path:
        if name not in made:
            d = tmp_path_factory.mktemp(f"replica-{name}")
            img = qemuboot.copy_image(base_image, d / "disk0.img")
            if edit is not None:
                with mounted_root(img, d / "mnt") as root:
                    edit(root)
            made[name] = img
        return made[name]

    return make


def _login(root: Path) -> None:
    """A getty on ttyS0, no report unit, and the kernel's messages on the console."""
    (root / "etc/systemd/system/serial-getty@ttyS0.service").unlink()
    (root / "etc/systemd/system/multi-user.target.wants/vimg-report.service").unlink()
    cfg = root / "boot/grub/grub.cfg"
    cfg.write_text(cfg.read_text().replace(" quiet", ""))


def _broken_fstab(root: Path) -> None:
    """The root entry names a filesystem that is not there, and so does a second entry (see test)."""
    fstab = root / "etc/fstab"
    lines = fstab.read_text().splitlines()
    lines = [
        "UUID=00000000-dead-beef-0000-000000000000 / ext4 errors=remount-ro 0 1"
        if ln.split()[1:2] == ["/"]
        else ln
        for ln in lines
    ]
    lines.append(
        "UUID=00000000-dead-beef-0000-000000000001 /srv ext4 defaults,x-systemd.device-timeout=10s 0 2"
    )
    fstab.write_text("\n".join(lines) + "\n")


AGENT_DEBS = ("qemu-guest-agent", "libglib2.0-0", "liburing2", "libnuma1")


def _agent_debs() -> list[Path]:
    """qemu-guest-agent and the libraries the test guest lacks, from Debian (cached beside the guests)."""
    debs = guestbuild.CACHE / "debs" / "agent"
    with guestbuild.locked("agent-debs"):
        if not all(list(debs.glob(f"{p}_*.deb")) for p in AGENT_DEBS):
            debs.mkdir(parents=True, exist_ok=True)
            guestbuild.run("apt-get", "download", *AGENT_DEBS, cwd=debs)
    return sorted(debs.glob("*.deb"))


def _with_agent(root: Path) -> None:
    """qemu-guest-agent unpacked into the guest; udev starts it when its virtio-serial port appears."""
    for deb in _agent_debs():
        tar = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], check=True, capture_output=True).stdout
        # --keep-directory-symlink: the guest is usrmerged (/lib -> usr/lib); never replace the link.
        subprocess.run(["tar", "-x", "--keep-directory-symlink", "-C", str(root)], input=tar, check=True)


def _zero_mbr(image: Path) -> None:
    with open(image, "r+b") as f:
        f.write(bytes(440))  # the boot code; the partition table and the 0x55AA signature stay


@pytest.fixture(scope="session")
def good_replica(make_replica: Callable[..., Path]) -> Path:
    return make_replica("good")


@pytest.fixture(scope="session")
def login_replica(make_replica: Callable[..., Path]) -> Path:
    return make_replica("login", _login)


@pytest.fixture(scope="session")
def agent_replica(make_replica: Callable[..., Path]) -> Path:
    return make_replica("agent", _with_agent)


@pytest.fixture(scope="session")
def fstab_replica(make_replica: Callable[..., Path]) -> Path:
    return make_replica("fstab", _broken_fstab)


@pytest.fixture(scope="session")
def mbr_replica(make_replica: Callable[..., Path]) -> Path:
    img = make_replica("mbr")
    _zero_mbr(img)
    return img


@pytest.fixture(scope="session")
def sums() -> dict[Path, str]:
    """sha256 of each replica, taken the first time a test uses it."""
    return {}


@pytest.fixture
def unchanged(sums: dict[Path, str]) -> Callable[[Path], Callable[[], None]]:
    """``check = unchanged(img)`` before the drill, ``check()`` after: the replica's sha256 is the same."""

    def take(img: Path) -> Callable[[], None]:
        if img not in sums:
            sums[img] = qemuboot.sha256(img)
        before = sums[img]
        return lambda: _same(img, before)

    return take


def _same(img: Path, before: str) -> None:
    assert qemuboot.sha256(img) == before, f"{img} was changed by the drill"


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """The drill's --workdir for one test; afterwards no qemu of this test may be running."""
    d = tmp_path / "work"
    d.mkdir()
    yield d
    left = qemus_under(d)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
    assert not left, f"qemu left running: {left}"
