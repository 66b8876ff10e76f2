"""rekernel --boot-check: the changed guest is booted with the drill before anything is committed.

A BOOTDIR whose initramfs carries a virtio_blk.ko that cannot load passes rekernel's preflight (it
checks the initramfs's file list) and fails only when booted: the boot check must refuse to commit
and leave DISK byte-identical. With the good BOOTDIR the check sees the new kernel running (read
from guest memory: the guests boot with ``quiet``) and the commit goes ahead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import guestbuild
import pytest
import qemuboot

pytestmark = [pytest.mark.boot, pytest.mark.slow, pytest.mark.guestfs]


@pytest.fixture(scope="session")
def good_bootdir() -> Path:
    return guestbuild.cloud_bootdir(initramfs=True)


@pytest.fixture(scope="session")
def cloud_version(good_bootdir: Path) -> str:
    (k,) = good_bootdir.glob("vmlinuz-*")
    return k.name.removeprefix("vmlinuz-")


@pytest.fixture(scope="session")
def broken_virtio_bootdir(
    tmp_path_factory: pytest.TempPathFactory, good_bootdir: Path, cloud_version: str
) -> Path:
    """The good BOOTDIR (hard links) with an initramfs whose virtio_blk.ko is zeroed: listed, never loads."""
    out = tmp_path_factory.mktemp("bootdir") / "bad"
    shutil.copytree(good_bootdir, out, copy_function=os.link)
    initrd = out / f"initrd.img-{cloud_version}"
    tree = out.parent / "unpacked"
    subprocess.run(["unmkinitramfs", str(initrd), str(tree)], check=True)
    (ko,) = tree.rglob("virtio_blk.ko*")
    size = ko.stat().st_size
    ko.unlink()
    ko.write_bytes(bytes(size))
    initrd.unlink()  # a hard link to the cached one: replace, never write through
    files = subprocess.run(
        "find . | LC_ALL=C sort", shell=True, cwd=tree, check=True, capture_output=True
    ).stdout
    cpio = subprocess.run(
        ["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"],
        cwd=tree,
        input=files,
        check=True,
        capture_output=True,
    ).stdout
    initrd.write_bytes(
        subprocess.run(["zstd", "-q", "-3"], input=cpio, check=True, capture_output=True).stdout
    )
    shutil.rmtree(tree)
    return out


@pytest.fixture
def disk(base_image: Path, tmp_path: Path) -> Path:
    return qemuboot.copy_image(base_image, tmp_path / "guest.img")


def rekernel(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vimgtools.rekernel", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=1500,
        check=False,
    )


def test_boot_check_refuses_a_kernel_that_does_not_boot(
    disk: Path, broken_virtio_bootdir: Path, workdir: Path, unchanged: Callable[[Path], Callable[[], None]]
) -> None:
    check = unchanged(disk)
    r = rekernel(
        disk, "--from", broken_virtio_bootdir, "--boot-check", "--boot-check-expect", "VIMG-DONE",
        "--boot-check-timeout", "300", "--workdir", workdir,
    )  # fmt: skip
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stdout.startswith("drill: did NOT boot"), r.stdout  # the drill's report
    assert "last stage reached:" in r.stdout and "last " in r.stdout
    errors = [ln for ln in r.stderr.splitlines() if ": error: " in ln]
    assert len(errors) == 1 and "boot check: the changed guest did not boot" in errors[0]
    assert "DISK was not written" in errors[0]
    check()


def test_boot_check_commits_when_the_new_kernel_runs(
    disk: Path, good_bootdir: Path, cloud_version: str, workdir: Path
) -> None:
    before = qemuboot.sha256(disk)
    r = rekernel(
        disk, "--from", good_bootdir, "--boot-check", "--boot-check-expect", "VIMG-DONE",
        "--boot-check-timeout", "400", "--workdir", workdir, "--json",
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["committed"] is True
    bc = out["boot_check"]
    assert bc["result"] == "booted" and bc["kernel"] == cloud_version
    assert [s["name"] for s in bc["stages"]][-1] == "expect"
    assert out["seconds"]["boot_check"] > 0
    assert qemuboot.sha256(disk) != before
