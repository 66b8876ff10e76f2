"""The planner is pure, checks say how they refuse, and rollback is a plan too."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from kernelhelp import bzimage

from vimgtools.boot import detect
from vimgtools.errors import BootloaderError, ImageRefused, InvalidInput, KernelError
from vimgtools.guest.facts import GuestFacts
from vimgtools.guest.steps import SetDefault, Write
from vimgtools.kernel import Kernel, find_kernel
from vimgtools.rekernel.plan import STATE_FILE, Check, Options, Plan, plan_rekernel, plan_rollback

DATA = Path(__file__).resolve().parents[1] / "data"
OLD = "6.1.0-50-amd64"
NEW = "6.1.0-56-cloud-amd64"


def facts(**kw: object) -> GuestFacts:
    base: dict[str, object] = {
        "root": "/dev/sda1",
        "arch": "x86_64",
        "distro": "debian",
        "product": "Debian 12",
        "mountpoints": {"/": "/dev/sda1"},
        "fs_types": {"/": "ext4"},
        "boot_separate": False,
        "lib_is_link": True,
        "modules_path": "/usr/lib/modules",
        "modules_on_boot": False,
        "module_versions": {OLD: 400 << 20},
        "boot_kernels": [OLD],
        "boot_free": 2 << 30,
        "boot_sector": b"\xeb\x63\x90" + b"GRUB " + bytes(502) + b"\x55\xaa",
        "files": {
            "/etc/default/grub": (DATA / "default-grub").read_text(),
            "/boot/grub/grub.cfg": (DATA / "grub2-debian12.cfg").read_text(),
        },
        "tools": {"/usr/sbin/update-grub", "/usr/bin/grub-editenv", "/usr/sbin/update-initramfs"},
    }
    base.update(kw)
    return GuestFacts(**base)  # type: ignore[arg-type]


@pytest.fixture
def kernel(tmp_path: Path) -> Kernel:
    d = tmp_path / "boot"
    mods = d / "modules" / NEW / "kernel"
    mods.mkdir(parents=True)
    (d / f"vmlinuz-{NEW}").write_bytes(bzimage(NEW))
    (d / f"initrd.img-{NEW}").write_bytes(bytes(1 << 20))
    (d / f"config-{NEW}").write_text("CONFIG_VIRTIO_PCI=y\nCONFIG_VIRTIO_BLK=m\nCONFIG_SCSI_VIRTIO=m\n")
    (mods / "virtio_blk.ko.xz").write_bytes(bytes(3 << 20))
    (mods / "virtio_scsi.ko").write_bytes(bytes(10))
    (mods / "ext4.ko").write_bytes(bytes(10))
    (d / "modules" / NEW / "modules.builtin").write_text("kernel/fs/xfs/xfs.ko\n")
    return find_kernel(d)


def plan(f: GuestFacts, k: Kernel, **options: object) -> Plan:
    return plan_rekernel(
        f,
        k,
        detect(f),
        disk="d.img",
        previous=OLD,
        options=Options(**options),  # type: ignore[arg-type]
        initrd_files=["x/virtio_blk.ko.xz", "x/virtio_scsi.ko", "x/ext4.ko"],
    )


def test_find_kernel_reads_what_the_planner_needs(kernel: Kernel) -> None:
    assert kernel.modules_bytes == (3 << 20) + 20 + len("kernel/fs/xfs/xfs.ko\n")
    assert kernel.files_bytes == 0x4000 + (1 << 20) + len(
        "CONFIG_VIRTIO_PCI=y\nCONFIG_VIRTIO_BLK=m\nCONFIG_SCSI_VIRTIO=m\n"
    )
    assert kernel.module_names == {"virtio_blk", "virtio_scsi", "ext4"}
    assert kernel.builtin_names == {"xfs"}
    assert kernel.driver_state("CONFIG_XFS_FS", "xfs") == "builtin"
    assert kernel.driver_state("CONFIG_VIRTIO_PCI", "virtio_pci") == "builtin"
    assert kernel.driver_state("CONFIG_EXT4_FS", "ext4") == "module"
    assert kernel.driver_state("CONFIG_XEN_BLKDEV_FRONTEND", "xen-blkfront") == "missing"


def test_planning_reads_nothing(kernel: Kernel) -> None:
    """The same plan with BOOTDIR gone: everything the planner uses was read by find_kernel."""
    before = plan(facts(), kernel)
    shutil.rmtree(kernel.image.parent)
    after = plan(facts(), kernel)
    assert after == before
    assert after.initramfs_modules == ("virtio_blk", "virtio_scsi", "ext4")  # virtio_pci is built in
    (space,) = [c for c in after.checks if c.name == "space"]
    assert "modules 3" in space.message and "kernel files 1" in space.message


def test_each_failed_check_refuses_as_its_class(kernel: Kernel) -> None:
    assert plan(facts(), kernel).refusal() is None
    small = plan(facts(boot_free=1 << 20), kernel)
    e = small.refusal()
    assert isinstance(e, ImageRefused) and str(e).startswith("d.img: preflight: space: /boot has 1 MiB free")
    arch = plan(facts(arch="aarch64", boot_free=1 << 20), kernel)
    assert [c.name for c in arch.errors] == ["arch", "space"]
    assert isinstance(arch.refusal(), KernelError), "the first failed error decides the class"
    assert "arch: kernel x86_64, guest aarch64" in str(arch.refusal()) and "space:" in str(arch.refusal())
    nocode = plan(facts(boot_sector=bytes(512)), kernel)
    e = nocode.refusal()
    assert isinstance(e, BootloaderError) and "(warnings: --force to go on)" in str(e)
    assert nocode.refusal(force=True) is None
    assert isinstance(plan(facts(arch="aarch64"), kernel).refusal(force=True), KernelError), (
        "errors never yield"
    )
    xfs = plan(facts(fs_types={"/": "zfs"}), kernel)
    assert isinstance(xfs.refusal(), KernelError) and "root-fs" in str(xfs.refusal())


def test_replace_is_reported_and_never_refuses(kernel: Kernel) -> None:
    p = plan(facts(boot_kernels=[OLD, NEW]), kernel)
    (replace,) = p.warnings
    assert replace.name == "replace" and replace.refuses_as is None
    assert p.refusal() is None
    assert replace.to_dict() == {
        "name": "replace",
        "ok": False,
        "severity": "warning",
        "message": f"/boot/vmlinuz-{NEW} exists and is replaced",
        "refuses_as": None,
    }
    assert Check("x", False, "m").to_dict()["refuses_as"] == "KernelError"


def state(**kw: object) -> str:
    return (
        json.dumps({"loader": "grub2", "tool": "vimgtools.rekernel", **kw}, indent=1, sort_keys=True) + "\n"
    )


def rollback_plan(text: str | None, kernels: tuple[str, ...] = (OLD, NEW)) -> Plan:
    f = facts(boot_kernels=list(kernels))
    if text is not None:
        f.files[STATE_FILE] = text
    return plan_rollback(f, detect(f), disk="d.img")


def test_rollback_plan() -> None:
    p = rollback_plan(state(version=NEW, previous=OLD))
    assert (p.action, p.version, p.previous, p.initramfs) == ("rollback", OLD, NEW, "unchanged")
    assert p.refusal() is None and all(c.ok for c in p.checks)
    set_default, write = p.steps
    assert set_default == SetDefault("grub2", OLD)
    assert (
        isinstance(write, Write)
        and write.path == STATE_FILE
        and write.old == state(version=NEW, previous=OLD)
    )
    assert json.loads(write.text) == json.loads(state(version=OLD, previous=NEW))
    text = p.describe(diffs=True)
    assert text.startswith(f"rollback d.img (/dev/sda1): {NEW} -> {OLD}")
    assert f'+ "version": "{OLD}"' in text
    assert p.to_dict()["action"] == "rollback"


@pytest.mark.parametrize(
    ("text", "kernels", "message"),
    [
        (None, (OLD, NEW), "state: no /boot/vimgtools/rekernel.json: this guest was not rekernelled"),
        ("{oops", (OLD, NEW), "state: /boot/vimgtools/rekernel.json: not JSON"),
        ("[1]", (OLD, NEW), "state: /boot/vimgtools/rekernel.json: not a JSON object"),
        (state(version=NEW), (OLD, NEW), "previous: /boot/vimgtools/rekernel.json does not name a previous"),
        (state(version=NEW, previous=OLD), (NEW,), f"previous: /boot/vmlinuz-{OLD} is gone"),
    ],
)
def test_rollback_refusals_are_invalid_input(
    text: str | None, kernels: tuple[str, ...], message: str
) -> None:
    p = rollback_plan(text, kernels)
    e = p.refusal()
    assert isinstance(e, InvalidInput) and e.exit_code == 2
    assert str(e).startswith(f"d.img: preflight: {message}")
    assert p.refusal(force=True) is not None, "--force never overrides an error"
    if "gone" not in message:
        assert p.steps == ()
