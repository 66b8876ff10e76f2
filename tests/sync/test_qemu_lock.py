"""A replica that a running QEMU holds open is refused; a source it writes gets a warning."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from synchelp import MiB, cli, digest, qemu_holding, write_image

from vimgtools.image import Image


@pytest.fixture
def running_vm(tmp_path: Path) -> Iterator[Path]:
    """A real (paused, TCG) qemu-system-x86_64 with a virtio disk on ``vm.img``."""
    disk = write_image(tmp_path / "vm.img", 8 * MiB, [(0, 8 * MiB)], seed=21)
    with qemu_holding(disk):
        yield disk


def test_dst_held_by_qemu_is_refused(running_vm: Path, tmp_path: Path) -> None:
    src = write_image(tmp_path / "src.img", 8 * MiB, [(0, 8 * MiB)], seed=22)
    before = digest(running_vm)
    p = cli(src, running_vm, check=2)
    assert "running VM" in p.stderr and "--force" in p.stderr and str(running_vm) in p.stderr
    assert digest(running_vm) == before
    cli("--force", src, running_vm)
    assert digest(running_vm) == digest(src)


def test_src_written_by_qemu_warns(running_vm: Path, tmp_path: Path) -> None:
    p = cli("--json", running_vm, tmp_path / "copy.img")
    assert "crash-consistent" in p.stderr
    assert "crash-consistent" in p.stdout  # in the JSON warnings too
    with Image(running_vm) as img:
        assert img.qemu_lock() == "writer"


def test_no_lock_without_qemu(tmp_path: Path) -> None:
    disk = write_image(tmp_path / "idle.img", MiB, [(0, MiB)])
    with Image(disk) as img:
        assert img.qemu_lock() is None
