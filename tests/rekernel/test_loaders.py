"""Loaders on config text, kernel inspection on real and synthetic images, and the planner on plain facts.

No appliance here: these run in a second and pin the pure parts the end-to-end tests rely on.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from vimgtools.boot import Extlinux, Grub2, GrubLegacy, detect
from vimgtools.boot.extlinux import add_label, parse_labels, set_default_label
from vimgtools.boot.grub2 import (
    cfg_default,
    entry_for,
    get_shell_var,
    make_grubenv,
    parse_grub_cfg,
    parse_grubenv,
    select,
    set_shell_var,
)
from vimgtools.boot.grub_legacy import add_title, parse_menu
from vimgtools.errors import BootloaderError, KernelError
from vimgtools.guest.facts import GuestFacts
from vimgtools.guest.steps import (
    InstallModules,
    Move,
    RemoveDir,
    RunCommand,
    SetDefault,
    Symlink,
    Upload,
    Write,
)
from vimgtools.kernel import find_kernel, parse_config, read_bzimage_header
from vimgtools.rekernel.plan import BOOT_MODULES_UNIT_NAME, Options, Plan, plan_rekernel

DATA = Path(__file__).parent.parent / "data"
OLD = "6.1.0-50-amd64"
NEW = "6.1.0-56-cloud-amd64"
UUID = "a3ba2f22-5319-4647-a3b9-f410b123c3e8"


# -- kernel image header -------------------------------------------------------------------------
def fake_bzimage(version: str, *, x64: bool = True, proto: int = 0x020F) -> bytes:
    """The parts of an x86 boot header that read_bzimage_header looks at (Documentation/x86/boot)."""
    data = bytearray(0x4000)
    data[0x1FE:0x200] = b"\x55\xaa"
    data[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", data, 0x206, proto)
    struct.pack_into("<H", data, 0x20E, 0x1000)
    banner = f"{version} (builder@example) #1 SMP".encode() + b"\0"
    data[0x1200 : 0x1200 + len(banner)] = banner
    struct.pack_into("<H", data, 0x236, 1 if x64 else 0)
    return bytes(data)


def test_header_of_the_hosts_real_kernel() -> None:
    kernels = sorted(Path("/boot").glob("vmlinuz-*"))
    assert kernels, "the Makefile installs linux-image-amd64 on the host"
    for k in kernels:
        hdr = read_bzimage_header(k.read_bytes()[: 1 << 16], name=str(k))
        assert hdr.version == k.name[len("vmlinuz-") :]
        assert hdr.arch == "x86_64"
        assert hdr.protocol >= (2, 12)


def test_header_synthetic_and_refusals() -> None:
    assert read_bzimage_header(fake_bzimage("5.4.0-1-x")).version == "5.4.0-1-x"
    assert read_bzimage_header(fake_bzimage("3.2.0", x64=False)).arch == "i386"
    assert read_bzimage_header(fake_bzimage("2.6.18", proto=0x0205)).arch == "i386"
    with pytest.raises(KernelError, match="not an x86 bzImage"):
        read_bzimage_header(b"\x7fELF" + bytes(0x400))
    broken = bytearray(fake_bzimage("x"))
    struct.pack_into("<H", broken, 0x20E, 0)
    with pytest.raises(KernelError, match="no kernel version"):
        read_bzimage_header(bytes(broken))


def make_bootdir(root: Path, version: str, *, image_name: str | None = None, mods: str | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / (image_name or f"vmlinuz-{version}")).write_bytes(fake_bzimage(version))
    m = root / "modules" / (mods or version) / "kernel" / "drivers"
    m.mkdir(parents=True)
    (m / "virtio_blk.ko").write_bytes(b"\0" * 100)
    (root / "modules" / (mods or version) / "build").symlink_to("/usr/src/linux-headers-x")
    (root / f"config-{version}").write_text(
        "CONFIG_VIRTIO_BLK=m\nCONFIG_EXT4_FS=y\n# CONFIG_XFS_FS is not set\n"
    )
    return root


def test_find_kernel(tmp_path: Path) -> None:
    d = make_bootdir(tmp_path / "b", "6.9.1-test")
    k = find_kernel(d)
    assert (k.version, k.arch, k.initramfs) == ("6.9.1-test", "x86_64", None)
    assert k.driver_state("CONFIG_VIRTIO_BLK", "virtio_blk") == "module"
    assert k.driver_state("CONFIG_EXT4_FS", "ext4") == "builtin"
    assert k.driver_state("CONFIG_XFS_FS", "xfs") == "missing"
    (d / "initrd.img-6.9.1-test").write_bytes(b"x")
    assert find_kernel(d).initramfs == d / "initrd.img-6.9.1-test"


def test_find_kernel_by_header_not_name(tmp_path: Path) -> None:
    d = make_bootdir(tmp_path / "b", "6.9.1-test", image_name="bzImage")
    assert find_kernel(d).version == "6.9.1-test"
    lying = make_bootdir(tmp_path / "c", "6.9.1-test", image_name="vmlinuz-9.9.9")
    with pytest.raises(KernelError, match=r"file name says 9\.9\.9 but the image says 6\.9\.1-test"):
        find_kernel(lying)


def test_find_kernel_refusals(tmp_path: Path) -> None:
    with pytest.raises(KernelError, match="not a directory"):
        find_kernel(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(KernelError, match="no x86 kernel image"):
        find_kernel(tmp_path / "empty")
    d = make_bootdir(tmp_path / "m", "6.9.1-test", mods="6.9.0-other")
    with pytest.raises(KernelError, match=r"modules are for 6\.9\.0-other"):
        find_kernel(d)
    two = make_bootdir(tmp_path / "two", "6.9.1-test")
    (two / "vmlinuz-6.9.2-test").write_bytes(fake_bzimage("6.9.2-test"))
    with pytest.raises(KernelError, match="several kernels"):
        find_kernel(two)
    assert find_kernel(two, version="6.9.1-test").version == "6.9.1-test"


def test_parse_config() -> None:
    c = parse_config('CONFIG_A=y\nCONFIG_B=m\n# CONFIG_C is not set\nCONFIG_D="x y"\n')
    assert c == {"CONFIG_A": "y", "CONFIG_B": "m", "CONFIG_D": '"x y"'}


# -- GRUB 2 --------------------------------------------------------------------------------------
def test_grub_cfg_debian_two_kernels() -> None:
    cfg = (DATA / "grub2-debian12.cfg").read_text()
    entries = parse_grub_cfg(cfg)
    kernels = {e.kernel for e in entries}
    assert kernels == {f"/boot/vmlinuz-{NEW}", f"/boot/vmlinuz-{OLD}"}
    new = entry_for(entries, NEW)
    assert new is not None and not new.recovery
    assert new.selector == f"gnulinux-advanced-{UUID}>gnulinux-{NEW}-advanced-{UUID}"
    old = entry_for(entries, OLD)
    assert old is not None and old.selector.endswith(f"gnulinux-{OLD}-advanced-{UUID}")
    # "0" is the first top-level entry; "1>2" the third entry of the submenu.
    first = select(entries, "0")
    assert first is not None and first.kernel == f"/boot/vmlinuz-{NEW}"
    third = select(entries, "1>2")
    assert third is not None and third.kernel == f"/boot/vmlinuz-{OLD}"
    assert select(entries, new.selector) == new
    assert select(entries, "no-such-id") is None
    assert entry_for(entries, "9.9.9") is None


def test_grub_default_resolution() -> None:
    cfg = (DATA / "grub2-debian12.cfg").read_text()
    assert cfg_default(cfg, {"saved_entry": "x>y"}) == "x>y"
    assert cfg_default(cfg, {}) == "0"
    assert cfg_default(cfg, {"saved_entry": "a", "next_entry": "b"}) == "b"
    assert cfg_default('set default="2"\n', {"saved_entry": "a"}) == "2"


def test_grub_sepboot_paths() -> None:
    cfg = (DATA / "grub2-sepboot.cfg").read_text()
    e = entry_for(parse_grub_cfg(cfg), OLD)
    assert e is not None and e.kernel == f"/vmlinuz-{OLD}" and e.initrd == f"/initrd.img-{OLD}"


def test_default_grub_edit() -> None:
    text = (DATA / "default-grub").read_text()
    new = set_shell_var(text, "GRUB_DEFAULT", "saved")
    assert get_shell_var(new, "GRUB_DEFAULT") == "saved"
    assert new.count("GRUB_DEFAULT=saved") == 2  # the commented example line stays as it was
    assert "#GRUB_DEFAULT=saved" in new
    assert set_shell_var(new, "GRUB_DEFAULT", "saved") == new
    assert get_shell_var(set_shell_var("A=1", "B", "2"), "B") == "2"
    assert get_shell_var(text, "GRUB_CMDLINE_LINUX_DEFAULT") == "quiet"


def test_grubenv_roundtrip() -> None:
    block = make_grubenv({"saved_entry": "a>b", "next_entry": ""})
    assert len(block) == 1024 and block.startswith("# GRUB Environment Block\n")
    assert parse_grubenv(block) == {"saved_entry": "a>b", "next_entry": ""}
    with pytest.raises(BootloaderError):
        make_grubenv({"x": "y" * 1100})


# -- extlinux ------------------------------------------------------------------------------------
def test_extlinux_add_label() -> None:
    text = (DATA / "extlinux-debian.conf").read_text()
    new = add_label(text, NEW)
    default, labels = parse_labels(new)
    assert default == f"vimg-{NEW}"
    assert [lab.name for lab in labels] == [f"vimg-{NEW}", "debian", "debian-recovery"]
    lab = labels[0]
    assert lab.kernel == f"/boot/vmlinuz-{NEW}" and lab.initrd == f"/boot/initrd.img-{NEW}"
    assert lab.append == "root=UUID=0b3c-1 ro console=ttyS0,115200n8 quiet"
    assert add_label(new, NEW) == new  # idempotent
    back = set_default_label(new, "debian")
    assert parse_labels(back)[0] == "debian"
    with pytest.raises(BootloaderError):
        set_default_label(new, "nope")


def test_syslinux_lowercase_relative_to_boot() -> None:
    new = add_label((DATA / "syslinux-sepboot.cfg").read_text(), "6.1.0-9-amd64")
    default, labels = parse_labels(new)
    assert default == "vimg-6.1.0-9-amd64"
    assert labels[0].kernel == "/vmlinuz-6.1.0-9-amd64"
    assert labels[0].initrd == "/initrd.img-6.1.0-9-amd64"
    assert labels[1].name == "linux" and labels[1].kernel == "/vmlinuz-5.10.0-9-amd64"


# -- GRUB legacy ---------------------------------------------------------------------------------
def test_menu_lst_add_title() -> None:
    text = (DATA / "menu.lst").read_text()
    new = add_title(text, NEW)
    default, titles = parse_menu(new)
    assert default == 0
    assert titles[0].kernel == f"/boot/vmlinuz-{NEW}" and titles[0].initrd == f"/boot/initrd.img-{NEW}"
    assert "fallback 1" in new and "hiddenmenu" in new
    assert (
        "root=/dev/xvda1 ro quiet" in new.splitlines()[new.splitlines().index(f"title {titles[0].title}") + 2]
    )
    assert [t.kernel for t in titles[1:]] == ["/boot/vmlinuz-2.6.32-5-amd64"] * 2
    assert add_title(new, NEW).count(f"vmlinuz-{NEW}") == 1


# -- detection and the planner on plain facts ----------------------------------------------------
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
def bootdir(tmp_path: Path) -> Path:
    d = make_bootdir(tmp_path / "b", NEW)
    (d / f"config-{NEW}").write_text(
        "CONFIG_VIRTIO_PCI=y\nCONFIG_VIRTIO_BLK=m\nCONFIG_SCSI_VIRTIO=m\nCONFIG_EXT4_FS=y\n"
    )
    scsi = d / "modules" / NEW / "kernel" / "drivers" / "virtio_scsi.ko"
    scsi.write_bytes(b"\0" * 10)
    (d / f"initrd.img-{NEW}").write_bytes(b"initrd")
    return d


INITRD_OK = [f"usr/lib/modules/{NEW}/kernel/drivers/block/virtio_blk.ko", "x/virtio_scsi.ko.zst"]


def test_detect_and_refusals() -> None:
    assert isinstance(detect(facts()), Grub2)
    f = facts(files={"/boot/extlinux/extlinux.conf": "DEFAULT a\nLABEL a\n KERNEL /boot/vmlinuz-1\n"})
    with pytest.raises(BootloaderError, match="no extlinux tool"):
        detect(f)
    f.tools.add("/usr/bin/extlinux")
    assert isinstance(detect(f), Extlinux)
    assert isinstance(
        detect(facts(files={"/boot/grub/menu.lst": (DATA / "menu.lst").read_text()})), GrubLegacy
    )
    with pytest.raises(BootloaderError, match="LILO"):
        detect(facts(files={"/etc/lilo.conf": (DATA / "lilo.conf").read_text()}, boot_sector=bytes(512)))
    with pytest.raises(BootloaderError, match="zipl"):
        detect(facts(files={"/etc/zipl.conf": (DATA / "zipl.conf").read_text()}))
    with pytest.raises(BootloaderError, match="no bootloader configuration"):
        detect(facts(files={}))
    bls = facts()
    bls.files["/etc/default/grub"] += "GRUB_ENABLE_BLSCFG=true\n"
    with pytest.raises(BootloaderError, match="BLS"):
        detect(bls)


def plan(f: GuestFacts, bootdir: Path, **kw: object) -> Plan:
    return plan_rekernel(
        f,
        find_kernel(bootdir),
        detect(f),
        disk="d.img",
        previous=OLD,
        options=Options(**kw),  # type: ignore[arg-type]
        initrd_files=INITRD_OK,
    )


def test_plan_usrmerge_moves_and_links(bootdir: Path) -> None:
    p = plan(facts(), bootdir)
    steps = list(p.steps)
    assert not p.errors
    assert Move(f"/usr/lib/modules/{OLD}", f"/boot/modules/{OLD}") in steps
    # move, then remove the directory, then link (never ln -sf onto a directory)
    i_rm = steps.index(RemoveDir("/usr/lib/modules"))
    i_ln = steps.index(Symlink("/boot/modules", "/usr/lib/modules"))
    assert steps.index(Move(f"/usr/lib/modules/{OLD}", f"/boot/modules/{OLD}")) < i_rm < i_ln
    assert InstallModules(str(bootdir / "modules" / NEW), f"/boot/modules/{NEW}", NEW) in steps
    assert Upload(str(bootdir / f"initrd.img-{NEW}"), f"/boot/initrd.img-{NEW}") in steps
    assert RunCommand(("/usr/sbin/update-grub",), "regenerate grub.cfg with the guest's own tool") in steps
    assert steps.index(SetDefault("grub2", NEW)) > i_ln
    edit = next(s for s in steps if isinstance(s, Write) and s.path == "/etc/default/grub")
    assert "+GRUB_DEFAULT=saved" in edit.diff()
    assert not any(isinstance(s, Write) and BOOT_MODULES_UNIT_NAME in s.path for s in steps)


def test_plan_convention_already_followed(bootdir: Path) -> None:
    f = facts(modules_on_boot=True, modules_path="/boot/modules")
    steps = list(plan(f, bootdir).steps)
    assert not any(isinstance(s, (Move, RemoveDir, Symlink)) for s in steps)
    assert InstallModules(str(bootdir / "modules" / NEW), f"/boot/modules/{NEW}", NEW) in steps


def test_plan_separate_boot_space_and_unit(bootdir: Path) -> None:
    f = facts(boot_separate=True, mountpoints={"/": "/dev/sda2", "/boot": "/dev/sda1"}, boot_free=200 << 20)
    p = plan(f, bootdir)
    (space,) = [c for c in p.checks if c.name == "space"]
    assert (
        not space.ok and "guest's module trees moved 400" in space.message and "200 MiB free" in space.message
    )
    f.boot_free = 1 << 30
    p = plan(f, bootdir)
    assert not p.errors
    unit = f"/etc/systemd/system/{BOOT_MODULES_UNIT_NAME}"
    assert any(isinstance(s, Write) and s.path == unit for s in p.steps)
    assert Symlink(unit, f"/etc/systemd/system/sysinit.target.wants/{BOOT_MODULES_UNIT_NAME}") in p.steps


def test_plan_driver_checks(bootdir: Path) -> None:
    f = facts()
    k = find_kernel(bootdir)
    lacking = plan_rekernel(
        f, k, detect(f), disk="d", previous=OLD, options=Options(), initrd_files=["usr/bin/busybox"]
    )
    bad = {c.name for c in lacking.errors}
    assert bad == {"driver:virtio_blk", "driver:virtio_scsi"}
    xen = plan_rekernel(
        f, k, detect(f), disk="d", previous=OLD, options=Options(target="xen"), initrd_files=[]
    )
    assert {c.name for c in xen.errors} == {"driver:xen-blkfront"}
    arch = plan_rekernel(
        facts(arch="aarch64"), k, detect(f), disk="d", previous=OLD, options=Options(), initrd_files=INITRD_OK
    )
    assert [c.name for c in arch.errors] == ["arch"]


def test_plan_regenerate(bootdir: Path) -> None:
    os.unlink(bootdir / f"initrd.img-{NEW}")
    p = plan(facts(), bootdir)
    assert p.initramfs == "regenerate:update-initramfs"
    why = "make the initramfs with the guest's own tool"
    assert RunCommand(("/usr/sbin/update-initramfs", "-c", "-k", NEW), why) in p.steps
    assert not any(isinstance(s, Upload) and "initrd" in s.dst for s in p.steps)
    os.unlink(bootdir / f"config-{NEW}")
    p = plan(facts(), bootdir)
    assert "config" in {c.name for c in p.errors}
    none = plan(facts(tools={"/usr/sbin/update-grub"}), bootdir)
    assert "initramfs-tool" in {c.name for c in none.errors}


def test_plan_selinux_and_no_boot_code(bootdir: Path) -> None:
    p = plan(facts(selinux="enforcing", boot_sector=bytes(512)), bootdir)
    assert Write("/.autorelabel", "", None) in p.steps
    assert [c.name for c in p.warnings] == ["boot-code"]


def test_plan_no_initramfs_and_no_regeneration(bootdir: Path) -> None:
    os.unlink(bootdir / f"initrd.img-{NEW}")
    p = plan(facts(), bootdir, regenerate_initramfs=False)
    bad = {c.name: c.message for c in p.errors}
    assert set(bad) == {"driver:virtio_blk", "driver:virtio_scsi"}
    assert "no initramfs" in bad["driver:virtio_blk"]


def test_prepare_modules_keeps_links_and_runs_depmod(tmp_path: Path) -> None:
    import tarfile

    from vimgtools.rekernel.apply import prepare_modules

    d = make_bootdir(tmp_path / "b", "6.9.1-test")
    (tmp_path / "work").mkdir()
    tar = prepare_modules(d / "modules" / "6.9.1-test", "6.9.1-test", tmp_path / "work")
    with tarfile.open(tar) as t:
        members = {m.name.removeprefix("./"): m for m in t.getmembers()}
    assert members["build"].issym() and members["build"].linkname == "/usr/src/linux-headers-x"
    assert "modules.dep" in members and "kernel/drivers/virtio_blk.ko" in members
    assert not (d / "modules" / "6.9.1-test" / "modules.dep").exists(), "BOOTDIR is not written"
