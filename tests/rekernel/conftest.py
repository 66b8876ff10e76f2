"""Fixtures of the rekernel tests: real Debian guests and kernels, built once and cached (guestbuild.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import guestbuild

DATA = Path(__file__).parent.parent / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def cloud_bootdir() -> Path:
    """Debian's cloud kernel, no initramfs."""
    return guestbuild.cloud_bootdir(initramfs=False)


@pytest.fixture(scope="session")
def cloud_bootdir_initrd() -> Path:
    """Debian's cloud kernel with an initramfs made by the guest's mkinitramfs."""
    return guestbuild.cloud_bootdir(initramfs=True)


@pytest.fixture(scope="session")
def grub2_image() -> Path:
    return guestbuild.guest_image("grub2")


@pytest.fixture(scope="session")
def sepboot_image() -> Path:
    return guestbuild.guest_image("grub2-sepboot")


@pytest.fixture(scope="session")
def nord_image() -> Path:
    return guestbuild.guest_image("nord")


@pytest.fixture(scope="session")
def lvm_image() -> Path:
    return guestbuild.guest_image("grub2-lvm")


@pytest.fixture(scope="session")
def guest_version() -> str:
    return guestbuild.guest_kernel_version(guestbuild.debootstrap_tree())
