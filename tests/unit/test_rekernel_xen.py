"""Xen -> KVM retargeting on a FakeGuest: the text edits, the planner on a Debian PV-shaped guest and on
synthetic SUSE-shaped trees (what cannot be booted here), each refusal, ``retarget()`` end to end
(edits, initramfs, boot code, verify), and the CLI's ``--target`` rules. No appliance: seconds.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from kernelhelp import bzimage

import vimgtools.rekernel.retargeting as retarget_mod
import vimgtools.rekernel.session as session_mod
from vimgtools.boot import detect
from vimgtools.errors import BootloaderError, GuestError, InvalidInput, KernelError
from vimgtools.guest.facts import collect_facts
from vimgtools.guest.fake import FakeGuest
from vimgtools.guest.inventory import collect_inventory
from vimgtools.guest.steps import Remove, RunCommand, Upload, Write
from vimgtools.rekernel.__main__ import main
from vimgtools.rekernel.retargeting import loader_regenerate, retarget, verify_retarget
from vimgtools.rekernel.xen import (
    Resolver,
    RetargetOptions,
    boot_disk_sh,
    edit_cmdline,
    edit_initramfs_tools_modules,
    edit_inittab,
    edit_securetty,
    edit_shell_vars,
    nic_link,
    parse_maps,
    plan_retarget,
)

OLD = "6.1.0-50-amd64"
U1, U2, U3 = (
    "11111111-2222-4333-8444-555555555555",
    "22222222-2222-4333-8444-555555555555",
    "33333333-2222-4333-8444-555555555555",
)
GRUB_MBR = b"\xeb\x63\x90GRUB " + bytes(502) + b"\x55\xaa"
NO_CODE = bytes(510) + b"\x55\xaa"
XEN_INITRD = ["usr/lib/modules/6.1.0-50-amd64/kernel/drivers/block/xen-blkfront.ko", "conf/initramfs.conf"]
KVM_INITRD = [
    f"usr/lib/modules/{OLD}/kernel/drivers/{m}.ko"
    for m in ("virtio/virtio_pci", "block/virtio_blk", "scsi/virtio_scsi", "net/virtio_net")
] + [f"usr/lib/modules/{OLD}/kernel/fs/ext4/ext4.ko", "lib/systemd/network/99-default.link"]


def shell_var(text: str, name: str) -> str:
    m = re.search(rf'^{name}="([^"]*)"', text, re.M)
    return m.group(1) if m else ""


def update_grub(g: FakeGuest, argv: tuple[str, ...]) -> str:
    """grub-mkconfig's linux lines: root=UUID of /, then GRUB_CMDLINE_LINUX and _DEFAULT, as Debian's."""
    conf = g.text("/etc/default/grub") or ""
    args = f"{shell_var(conf, 'GRUB_CMDLINE_LINUX')} {shell_var(conf, 'GRUB_CMDLINE_LINUX_DEFAULT')}".strip()
    cfg = ["set default=0\n"]
    for v in sorted((n[8:] for n in g.ls("/boot") if n.startswith("vmlinuz-")), reverse=True):
        cfg.append(
            f"menuentry 'Debian GNU/Linux, with Linux {v}' $menuentry_id_option 'gnulinux-{v}-advanced-{U1}' {{\n"
            f"\tlinux\t/boot/vmlinuz-{v} root=UUID={U1} ro {args}\n\tinitrd\t/boot/initrd.img-{v}\n}}\n"
        )
    g.write("/boot/grub/grub.cfg", "".join(cfg))
    return ""


def grub_install(g: FakeGuest, argv: tuple[str, ...]) -> str:
    """The retarget's ``sh -c '... grub-install --target=i386-pc "$d" ...'`` (the disk holding /boot)."""
    assert "grub-install --target=i386-pc" in argv[-1] and "/proc/mounts" in argv[-1]
    g.devices["/dev/sda"] = GRUB_MBR
    return ""


def update_initramfs(g: FakeGuest, argv: tuple[str, ...]) -> str:
    mods = (g.text("/etc/initramfs-tools/modules") or "").split()
    g.write(f"/boot/initrd.img-{argv[-1]}", "\n".join(mods))
    return ""


def xen_debian(*, mbr: bytes = NO_CODE, partitioned: bool = True) -> FakeGuest:
    """Debian 12 as it came off a Xen PV host: xvd names, hvc0, xen-only initramfs, enX0, no MBR code."""
    root, srv = ("/dev/sda1", "/dev/sda2") if partitioned else ("/dev/sda", "/dev/sdb")
    g = FakeGuest(
        roots=[root],
        mountpoints={"/": root, "/srv": srv},
        devices={"/dev/sda": mbr},
        uuids={root: U1, srv: U2},
        disks=["/dev/sda"] if partitioned else ["/dev/sda", "/dev/sdb"],
    )
    g.put_link("/lib", "usr/lib")
    for m in (
        "virtio/virtio_pci",
        "block/virtio_blk",
        "scsi/virtio_scsi",
        "net/virtio_net",
        "block/xen-blkfront",
    ):
        g.put(f"/usr/lib/modules/{OLD}/kernel/drivers/{m}.ko", b"m")
    g.put(f"/usr/lib/modules/{OLD}/kernel/fs/ext4/ext4.ko", b"m")
    g.put(f"/usr/lib/modules/{OLD}/modules.builtin", "kernel/drivers/tty/hvc/hvc_xen.ko\n")
    g.put(f"/boot/vmlinuz-{OLD}", bzimage(OLD))
    g.put(
        f"/boot/config-{OLD}", "CONFIG_XEN_PV=y\nCONFIG_VIRTIO_BLK=m\nCONFIG_VIRTIO_PCI=m\nCONFIG_EXT4_FS=m\n"
    )
    g.put(f"/boot/initrd.img-{OLD}", "xen-blkfront xen-netfront ext4")
    d1 = "1" if partitioned else ""
    d2 = "2" if partitioned else ""
    disk2 = "xvda" if partitioned else "xvdb"
    g.put(
        "/etc/fstab", f"/dev/xvda{d1} / ext4 errors=remount-ro 0 1\n/dev/{disk2}{d2} /srv ext4 defaults 0 2\n"
    )
    g.put(
        "/etc/default/grub",
        f'GRUB_DEFAULT=0\nGRUB_CMDLINE_LINUX_DEFAULT="root=/dev/xvda{d1} console=hvc0 quiet"\n'
        'GRUB_CMDLINE_LINUX="xencons=tty"\nGRUB_CMDLINE_LINUX_RECOVERY="console=hvc0 single"\n',
    )
    g.put("/etc/initramfs-tools/initramfs.conf", "MODULES=list\n")
    g.put("/etc/initramfs-tools/modules", "# Xen PV\nxen-blkfront\nxen-netfront\next4\n")
    g.put("/etc/network/interfaces", "auto lo\niface lo inet loopback\nauto enX0\niface enX0 inet dhcp\n")
    g.put(
        "/etc/udev/rules.d/70-persistent-net.rules",
        'SUBSYSTEM=="net", DRIVERS=="vif", ATTR{address}=="00:16:3e:00:00:01", NAME="enX0"\n',
    )
    g.put_link(
        "/etc/systemd/system/getty.target.wants/serial-getty@hvc0.service",
        "/lib/systemd/system/serial-getty@.service",
    )
    g.put_link(
        "/etc/systemd/system/getty.target.wants/getty@tty1.service", "/lib/systemd/system/getty@.service"
    )
    g.put("/usr/lib/systemd/systemd-udevd", b"")
    for tool in (
        "/usr/sbin/update-grub",
        "/usr/sbin/grub-install",
        "/usr/sbin/update-initramfs",
        "/usr/bin/grub-editenv",
    ):
        g.put(tool, "#!/bin/sh\n")
    g.handlers.update({"update-grub": update_grub, "sh": grub_install, "update-initramfs": update_initramfs})
    g.mkdir_p("/boot/grub")
    update_grub(g, ("update-grub",))
    return g


def plan_for(g: FakeGuest, **kw: object) -> tuple[object, object, object]:
    g.mount_root(g.roots()[0])
    facts = collect_facts(g, g.roots()[0])
    loader = detect(facts)
    inv = collect_inventory(g, facts.boot_kernels)
    options = RetargetOptions(**kw)  # type: ignore[arg-type]
    plan = plan_retarget(
        facts,
        inv,
        loader.name,
        loader_regenerate(loader, facts),
        disk="d.img",
        version=OLD,
        initrd_path=f"/boot/initrd.img-{OLD}",
        initrd_files=KVM_INITRD if not options.regenerate else None,
        initrd_texts={},
        options=options,
    )
    return facts, loader, plan


# -- text edits -----------------------------------------------------------------------------------
def test_cmdline_consoles_root_and_xencons() -> None:
    g = xen_debian()
    inv = collect_inventory(g, [OLD])
    problems: list[str] = []
    r = Resolver(inv)
    out = edit_cmdline(
        "root=/dev/xvda1 ro console=hvc0 xencons=tty quiet resume=/dev/xvda2", r, problems, "x"
    )
    assert out == f"root=UUID={U1} ro console=tty0 console=ttyS0,115200 quiet resume=UUID={U2}"
    assert (
        edit_cmdline("console=ttyS0,9600 console=xvc0", r, problems, "x") == "console=ttyS0,9600 console=tty0"
    )
    assert edit_cmdline("root=/dev/xvdc1", r, problems, "x") == "root=/dev/xvdc1"
    assert problems == ["x: root=/dev/xvdc1: /dev/xvdc1 would be /dev/sdc1, which holds no filesystem"]


def test_every_grub_cmdline_variable_is_edited() -> None:
    text = "A=1\nGRUB_CMDLINE_LINUX=\"console=hvc0\"\nGRUB_CMDLINE_LINUX_DEFAULT='quiet console=hvc0'\n"
    out = edit_shell_vars(text, r"GRUB_CMDLINE_LINUX\w*", lambda v: v.replace("hvc0", "ttyS0"))
    assert (
        out == "A=1\nGRUB_CMDLINE_LINUX=\"console=ttyS0\"\nGRUB_CMDLINE_LINUX_DEFAULT='quiet console=ttyS0'\n"
    )


def test_inittab_securetty_and_module_lists() -> None:
    assert edit_inittab(
        "1:2345:respawn:/sbin/getty 38400 tty1\nhvc0:2345:respawn:/sbin/getty 38400 hvc0\n"
    ) == ("1:2345:respawn:/sbin/getty 38400 tty1\nS0:2345:respawn:/sbin/getty 38400 ttyS0\n")
    assert edit_inittab("S0:23:respawn:/sbin/getty ttyS0\nco:2345:respawn:/sbin/agetty xvc0 9600\n").endswith(
        "# vimgtools (Xen console): co:2345:respawn:/sbin/agetty xvc0 9600\n"
    )
    assert edit_securetty("console\nhvc0\n") == "console\nttyS0\n"
    out = edit_initramfs_tools_modules("xen-blkfront\nxen_netfront\next4\n", ["virtio_blk", "ext4"])
    assert out.split("\n")[0] == "ext4" and "virtio_blk" in out and "xen" not in out


def test_maps_are_validated() -> None:
    assert parse_maps(["/dev/hda=/dev/sda"]) == (("/dev/hda", "/dev/sda"),)
    with pytest.raises(InvalidInput, match="OLD=NEW"):
        parse_maps(["hda:sda"])


# -- the planner on the Debian PV guest -----------------------------------------------------------
def test_plan_retargets_every_place() -> None:
    _facts, _loader, plan = plan_for(xen_debian())
    writes = {s.path: s.text for s in plan.steps if isinstance(s, Write)}  # type: ignore[attr-defined]
    assert (
        writes["/etc/fstab"] == f"UUID={U1} / ext4 errors=remount-ro 0 1\nUUID={U2} /srv ext4 defaults 0 2\n"
    )
    grub = writes["/etc/default/grub"]
    assert f'GRUB_CMDLINE_LINUX_DEFAULT="root=UUID={U1} console=tty0 console=ttyS0,115200 quiet"' in grub
    assert 'GRUB_CMDLINE_LINUX=""' in grub and 'RECOVERY="console=tty0 console=ttyS0,115200 single"' in grub
    mods = writes["/etc/initramfs-tools/modules"].split()
    assert {"virtio_pci", "virtio_blk", "virtio_scsi", "virtio_net", "ext4"} <= set(mods)
    assert not any("xen" in m for m in mods)
    assert writes["/etc/systemd/network/10-vimgtools-enX0.link"] == nic_link("enX0")[1]
    assert "Driver=virtio_net" in nic_link("enX0")[1] and "Name=enX0" in nic_link("enX0")[1]
    assert writes["/etc/udev/rules.d/70-persistent-net.rules"] == ""
    removes = [s.path for s in plan.steps if isinstance(s, Remove)]  # type: ignore[attr-defined]
    assert removes == ["/etc/systemd/system/getty.target.wants/serial-getty@hvc0.service"]
    cmds = [s.argv for s in plan.steps if isinstance(s, RunCommand)]  # type: ignore[attr-defined]
    assert cmds == [
        ("/usr/sbin/update-initramfs", "-u", "-k", OLD),
        ("/usr/sbin/update-grub",),
        ("/bin/sh", "-c", cmds[-1][-1]),
    ], "edits, then the initramfs, then grub.cfg, then the boot code"
    assert "/usr/sbin/grub-install --target=i386-pc" in cmds[-1][-1] and "device.map" in cmds[-1][-1]
    assert plan.refusal() is None  # type: ignore[attr-defined]
    d = plan.to_dict()  # type: ignore[attr-defined]
    assert d["action"] == "retarget" and d["retarget"]["rewrites"] == {
        "/dev/xvda1": f"UUID={U1}",
        "/dev/xvda2": f"UUID={U2}",
    }
    assert d["retarget"]["inventory"]["disks"] == [
        {"device": "/dev/sda", "partitioned": True, "boot_code": None}
    ]
    assert "/dev/xvda1 -> UUID=" in plan.describe()  # type: ignore[attr-defined]


def test_a_guest_that_is_not_from_xen_gets_nothing() -> None:
    g = xen_debian(mbr=GRUB_MBR)
    g.put("/etc/fstab", f"UUID={U1} / ext4 defaults 0 1\n")
    g.put("/etc/default/grub", 'GRUB_CMDLINE_LINUX="console=ttyS0"\n')
    g.put("/etc/initramfs-tools/modules", "")
    g.rm_f("/etc/systemd/system/getty.target.wants/serial-getty@hvc0.service")
    update_grub(g, ())
    _f, _l, plan = plan_for(g)
    assert plan.steps == () and plan.retarget["xen"] is False  # type: ignore[attr-defined]


# -- refusals -------------------------------------------------------------------------------------
def test_an_unmappable_root_is_refused() -> None:
    g = xen_debian()
    g.put("/etc/fstab", "/dev/xvdc1 / ext4 defaults 0 1\n/dev/xvdd1 /data ext4 nofail 0 2\n")
    _f, _l, plan = plan_for(g)
    err = plan.refusal()  # type: ignore[attr-defined]
    assert isinstance(err, InvalidInput) and "root:" in str(err) and "--map" in str(err)
    fstab = next(s.text for s in plan.steps if isinstance(s, Write) and s.path == "/etc/fstab")  # type: ignore[attr-defined]
    assert fstab.splitlines()[1].startswith("# vimgtools: no filesystem"), "a nofail entry is commented out"


def test_an_entry_resolving_to_two_filesystems_is_refused() -> None:
    g = xen_debian()
    g.uuids["/dev/sda2"] = U1  # a cloned filesystem: two with one UUID
    _f, _l, plan = plan_for(g)
    err = plan.refusal()  # type: ignore[attr-defined]
    assert isinstance(err, InvalidInput) and "2 filesystems have UUID" in str(err)


def test_map_rewrites_hd_names() -> None:
    g = xen_debian()
    g.put("/etc/fstab", "/dev/hda1 / ext4 defaults 0 1\n/dev/xvda2 /srv ext4 defaults 0 2\n")
    _f, _l, plan = plan_for(g, maps=(("/dev/hda", "/dev/sda"),))
    fstab = next(s.text for s in plan.steps if isinstance(s, Write) and s.path == "/etc/fstab")  # type: ignore[attr-defined]
    assert fstab.startswith(f"UUID={U1} / ")


def test_a_pv_only_kernel_is_refused() -> None:
    g = xen_debian()
    g.put(f"/boot/config-{OLD}", "CONFIG_X86_64_XEN=y\nCONFIG_VIRTIO_BLK=m\n")
    _f, _l, plan = plan_for(g)
    err = plan.refusal()  # type: ignore[attr-defined]
    assert isinstance(err, KernelError) and "PV-only" in str(err) and "--from" in str(err)


def test_no_virtio_driver_is_refused() -> None:
    g = xen_debian()
    g.rm_f(f"/usr/lib/modules/{OLD}/kernel/drivers/block/virtio_blk.ko")
    g.put(f"/boot/config-{OLD}", "CONFIG_XEN_PV=y\n")
    _f, _l, plan = plan_for(g)
    err = plan.refusal()  # type: ignore[attr-defined]
    assert isinstance(err, KernelError) and "kvm-driver:virtio_blk" in str(err)


def test_partitionless_is_refused_with_the_way_out() -> None:
    g = xen_debian(partitioned=False)
    _f, _l, plan = plan_for(g)
    err = plan.refusal()  # type: ignore[attr-defined]
    assert isinstance(err, BootloaderError)
    assert "no partition table" in str(err) and "<kernel>/boot/vmlinuz-" in str(err) and "-append" in str(err)
    assert f"root=UUID={U1}" in str(err)
    assert plan.refusal(force=True) is None  # type: ignore[attr-defined]


def test_a_supplied_initramfs_is_checked() -> None:
    g = xen_debian()
    _f, _l, plan = plan_for(g, regenerate=False, supplied="/host/initrd")
    names = {c.name: c for c in plan.checks}  # type: ignore[attr-defined]
    assert names["initramfs-drivers"].ok and names["initramfs-version"].ok
    assert not names["initramfs-nic"].ok, "99-default.link would name the NIC before the guest's .link"
    assert Upload("/host/initrd", f"/boot/initrd.img-{OLD}") in plan.steps  # type: ignore[attr-defined]


# -- synthetic SUSE-shaped trees (cannot be booted here) ------------------------------------------
def suse_guest(*, kernel_flavour: str = "default", config: str | None = "CONFIG_VIRTIO_BLK=m\n") -> FakeGuest:
    ver = f"3.0.101-63-{kernel_flavour}"
    g = FakeGuest(
        roots=["/dev/sda2"],
        mountpoints={"/": "/dev/sda2", "/boot": "/dev/sda1"},
        uuids={"/dev/sda1": U3, "/dev/sda2": U1},
        devices={"/dev/sda": GRUB_MBR},
        distro="sles",
        product="SUSE Linux Enterprise Server 11",
    )
    g.put("/etc/os-release", 'NAME="SLES"\nVERSION="11.4"\nID="sles"\n')
    g.put(f"/boot/vmlinuz-{ver}", bzimage(ver))
    g.put(f"/boot/initrd-{ver}", b"x")
    if config is not None:
        g.put(f"/boot/config-{ver}", config)
    g.put(f"/lib/modules/{ver}/kernel/drivers/block/virtio_blk.ko", b"m")
    g.put(f"/lib/modules/{ver}/kernel/drivers/virtio/virtio_pci.ko", b"m")
    g.put(f"/lib/modules/{ver}/kernel/drivers/scsi/virtio_scsi.ko", b"m")
    g.put(f"/lib/modules/{ver}/kernel/drivers/net/virtio_net.ko", b"m")
    g.put(f"/lib/modules/{ver}/kernel/fs/ext4/ext4.ko", b"m")
    g.put("/etc/fstab", "/dev/xvda2 / ext3 acl,user_xattr 1 1\n/dev/xvda1 /boot ext3 acl 1 2\n")
    g.put(
        "/boot/grub/menu.lst",
        "default 0\ntimeout 8\n\ntitle SLES 11\n    root (hd0,0)\n"
        f"    kernel /vmlinuz-{ver} root=/dev/xvda2 console=xvc0 xencons=xvc splash=silent\n"
        f"    initrd /initrd-{ver}\n",
    )
    g.put(
        "/etc/sysconfig/kernel",
        'INITRD_MODULES="processor thermal xenblk ext3"\nDOMU_INITRD_MODULES="xennet xenblk"\n',
    )
    g.put(
        "/etc/sysconfig/bootloader",
        'LOADER_TYPE="grub"\nDEFAULT_APPEND="console=xvc0 splash=silent"\nFAILSAFE_APPEND="console=xvc0 x11failsafe"\n',
    )
    g.put("/etc/inittab", "id:3:initdefault:\nx0:12345:respawn:/sbin/agetty -L 9600 xvc0 xterm\n")
    g.put("/etc/securetty", "console\nxvc0\n")
    g.put("/etc/modprobe.d/xen.conf", "alias scsi_hostadapter xenblk\nalias eth0 xennet\n")
    g.put("/etc/sysconfig/network/ifcfg-eth0", "BOOTPROTO='dhcp'\nSTARTMODE='auto'\n")
    g.put("/sbin/mkinitrd", "#!/bin/sh\n")
    return g


def suse_plan(g: FakeGuest) -> object:
    g.mount_root(g.roots()[0])
    facts = collect_facts(g, g.roots()[0])
    loader = detect(facts)
    assert loader.name == "grub-legacy"
    inv = collect_inventory(g, facts.boot_kernels)
    ver = facts.boot_kernels[0]
    return plan_retarget(
        facts,
        inv,
        loader.name,
        loader_regenerate(loader, facts),
        disk="sles.img",
        version=ver,
        initrd_path=f"/boot/initrd-{ver}",
        initrd_files=None,
        initrd_texts=None,
        options=RetargetOptions(),
    )


def test_suse_tree_edits() -> None:
    plan = suse_plan(suse_guest())
    writes = {s.path: s.text for s in plan.steps if isinstance(s, Write)}  # type: ignore[attr-defined]
    menu = writes["/boot/grub/menu.lst"]
    assert f"root=UUID={U1} console=tty0 console=ttyS0,115200 splash=silent" in menu and "xvc0" not in menu
    assert "root (hd0,0)" in menu, "GRUB legacy's own device syntax is not a Linux device name"
    kernel = writes["/etc/sysconfig/kernel"]
    assert 'INITRD_MODULES="processor thermal ext3 virtio_pci virtio_blk virtio_scsi' in kernel
    assert 'DOMU_INITRD_MODULES=""' in kernel
    boot = writes["/etc/sysconfig/bootloader"]
    assert 'DEFAULT_APPEND="console=tty0 console=ttyS0,115200 splash=silent"' in boot and "xvc0" not in boot
    assert "ttyS0" in writes["/etc/inittab"] and "xvc0" not in writes["/etc/inittab"]
    assert writes["/etc/securetty"] == "console\nttyS0\n"
    assert writes["/etc/modprobe.d/xen.conf"].count("# vimgtools (Xen only)") == 2
    assert writes["/etc/fstab"] == f"UUID={U1} / ext3 acl,user_xattr 1 1\nUUID={U3} /boot ext3 acl 1 2\n"
    assert "/etc/systemd/network/10-vimgtools-eth0.link" not in writes, "no systemd-udevd: a udev rule"
    assert 'NAME="eth0"' in writes["/etc/udev/rules.d/70-vimgtools-eth0.rules"]
    cmds = [s.argv for s in plan.steps if isinstance(s, RunCommand)]  # type: ignore[attr-defined]
    assert cmds[0][0] == "/sbin/mkinitrd", "the initramfs is remade by the guest's mkinitrd"
    assert plan.refusal() is None  # type: ignore[attr-defined]


def test_grub_legacy_without_boot_code_and_several_nics_are_said_plainly() -> None:
    """GRUB legacy boot code is not written (#13 names grub-install for i386-pc and syslinux's mbr.bin):
    a warning naming the disk, refusing as BootloaderError unless --force. Several NICs: reported, no
    name kept (which virtio NIC is which is not known), nothing refused."""
    g = suse_guest()
    g.devices["/dev/sda"] = bytes(510) + b"\x55\xaa"  # pygrub never needed boot code
    g.put("/etc/sysconfig/network/ifcfg-eth1", "BOOTPROTO='dhcp'\n")
    plan = suse_plan(g)
    checks = {c.name: c for c in plan.checks}  # type: ignore[attr-defined]
    code = checks["boot-code"]
    assert not code.ok and code.severity == "warning" and code.refuses_as is BootloaderError
    assert code.message.startswith("no boot code on /dev/sda, and no way to write grub-legacy's here")
    err = plan.refusal()  # type: ignore[attr-defined]
    assert isinstance(err, BootloaderError) and str(err).startswith("sles.img: preflight: boot-code: ")
    assert "--force" in str(err) and plan.refusal(force=True) is None  # type: ignore[attr-defined]
    nic = checks["nic"]
    assert not nic.ok and nic.refuses_as is None and "several NICs configured (eth0, eth1)" in nic.message
    assert not any("70-vimgtools-" in getattr(s, "path", "") for s in plan.steps)  # type: ignore[attr-defined]


def test_suse_kernel_xen_is_refused() -> None:
    plan = suse_plan(suse_guest(kernel_flavour="xen", config=None))
    err = plan.refusal()  # type: ignore[attr-defined]
    assert isinstance(err, KernelError) and "PV-only" in str(err)


# -- retarget() end to end on the fake, and the CLI -----------------------------------------------
@pytest.fixture
def disk(tmp_path: Path) -> Path:
    d = tmp_path / "vm" / "xen.img"
    d.parent.mkdir()
    d.write_bytes(bytes(1 << 20))
    return d


@pytest.fixture
def guest(monkeypatch: pytest.MonkeyPatch) -> FakeGuest:
    g = xen_debian()
    commits: list[Path] = []
    monkeypatch.setattr(session_mod, "open_image", lambda overlay: g)
    monkeypatch.setattr(
        session_mod, "commit_overlay", lambda overlay, disk, fmt: commits.append(disk) or 4096
    )

    def host_initramfs(gi: FakeGuest, path: str) -> tuple[list[str], dict[str, str]]:
        mods = (gi.text(path) or "").split()
        return [f"usr/lib/modules/{OLD}/kernel/x/{m}.ko" for m in mods], {
            "conf/conf.d/resume": "RESUME=none\n"
        }

    monkeypatch.setattr(retarget_mod, "_host_initramfs", host_initramfs)
    g.commits = commits  # type: ignore[attr-defined]
    return g


def test_retarget_applies_verifies_and_commits(disk: Path, guest: FakeGuest) -> None:
    result = retarget(disk, fmt="raw")
    assert result.committed and guest.commits == [disk]  # type: ignore[attr-defined]
    cfg = guest.text("/boot/grub/grub.cfg") or ""
    assert "hvc0" not in cfg and "xvda" not in cfg and "console=ttyS0,115200" in cfg
    assert guest.devices["/dev/sda"] == GRUB_MBR, "grub-install wrote the boot code"
    assert "virtio_blk" in (guest.text(f"/boot/initrd.img-{OLD}") or "")
    assert not guest.exists("/etc/systemd/system/getty.target.wants/serial-getty@hvc0.service")
    assert guest.is_symlink("/etc/systemd/system/getty.target.wants/getty@tty1.service")
    v = result.verified
    assert v["xen_names_left"] == 0 and v["boot_code"] == "grub" and v["fstab"] == "every entry resolves"
    assert set(v["initramfs"]["drivers"]) == {"virtio_pci", "virtio_blk", "virtio_scsi", "ext4"}
    assert {"launch", "inventory", "apply", "verify", "commit", "total"} <= set(result.seconds)


def test_verify_finds_what_is_left(disk: Path, guest: FakeGuest) -> None:
    _f, _l, plan = plan_for(guest)
    with pytest.raises(GuestError, match=r"Xen names left: /boot/grub/grub\.cfg"):
        verify_retarget(guest, plan)  # type: ignore[arg-type]


def test_retarget_refusal_changes_nothing(disk: Path, guest: FakeGuest) -> None:
    guest.put(f"/boot/config-{OLD}", "CONFIG_X86_64_XEN=y\n")
    with pytest.raises(KernelError) as e:
        retarget(disk, fmt="raw")
    assert guest.commits == [] and guest.closed is False  # type: ignore[attr-defined]
    assert e.value.result is not None and e.value.result.plan is not None


def test_cli_retarget_json_and_target_xen(
    disk: Path, guest: FakeGuest, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--json", "--dry-run", "--format", "raw", str(disk)]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["action"] == "retarget" and obj["dry_run"] and not obj["committed"]
    assert guest.commits == []  # type: ignore[attr-defined]
    assert main(["--target", "xen", str(disk)]) == 2
    assert "not supported" in capsys.readouterr().err


# -- a kernel from BOOTDIR and the retarget in one run ---------------------------------------------
NEW = "6.1.0-56-cloud-amd64"


def grub_editenv(g: FakeGuest, argv: tuple[str, ...]) -> str:
    _tool, envfile, _op, *assignments = argv
    g.write(envfile, "# GRUB Environment Block\n" + "".join(a + "\n" for a in assignments))
    return ""


def test_rekernel_from_bootdir_retargets_in_the_same_run(
    disk: Path, guest: FakeGuest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    boot = tmp_path / "boot"
    mods = boot / "modules" / NEW / "kernel"
    mods.mkdir(parents=True)
    (boot / f"vmlinuz-{NEW}").write_bytes(bzimage(NEW))
    (boot / f"config-{NEW}").write_text(
        "CONFIG_VIRTIO_PCI=y\nCONFIG_VIRTIO_BLK=m\nCONFIG_SCSI_VIRTIO=m\nCONFIG_EXT4_FS=y\n"
    )
    for m in ("virtio_blk", "virtio_scsi", "virtio_net"):
        (mods / f"{m}.ko").write_bytes(b"m")
    (boot / f"initrd.img-{NEW}").write_bytes(b"initrd")
    listed = [f"usr/lib/modules/{NEW}/kernel/{m}.ko" for m in ("virtio_blk", "virtio_scsi", "virtio_net")]
    listed += ["usr/lib/systemd/network/99-default.link", "usr/lib/systemd/network/10-vimgtools-enX0.link"]
    monkeypatch.setattr("vimgtools.rekernel.list_initramfs", lambda path: listed)
    monkeypatch.setattr(retarget_mod, "initramfs_texts", lambda path: {"conf/conf.d/resume": "RESUME=none\n"})
    guest.handlers["grub-editenv"] = grub_editenv
    from vimgtools.rekernel import rekernel

    result = rekernel(disk, boot, fmt="raw")
    assert result.committed and result.plan is not None
    first = result.plan.steps[0]
    assert isinstance(first, Write) and first.path == "/etc/fstab", "the edits come before the kernel's steps"
    install = result.plan.steps[-1]
    assert isinstance(install, RunCommand) and "grub-install" in install.argv[-1] and install.attempts == 3
    assert not [c for c in result.plan.checks if c.name == "boot-code" and not c.ok]
    names = {c.name for c in result.plan.checks}
    assert {"initramfs-config", "initramfs-nic", "root", "devices"} <= names
    assert result.verified["xen_names_left"] == 0 and result.verified["default_entry"]["kernel"].endswith(NEW)
    assert (guest.text("/etc/fstab") or "").startswith(f"UUID={U1} / ")
    assert guest.devices["/dev/sda"] == GRUB_MBR


def test_a_flaky_command_is_tried_again(disk: Path, guest: FakeGuest) -> None:
    tries: list[int] = []

    def flaky(g: FakeGuest, argv: tuple[str, ...]) -> str:
        tries.append(1)
        if len(tries) < 3:
            raise GuestError("grub-install: error: embedding is not possible (cross-disk install)")
        return grub_install(g, argv)

    guest.handlers["sh"] = flaky
    assert retarget(disk, fmt="raw").committed and len(tries) == 3


def test_dracut_guest_gets_the_virtio_drivers() -> None:
    g = xen_debian()
    g.rm_f("/etc/initramfs-tools/initramfs.conf")
    g.rm_f("/usr/sbin/update-initramfs")
    g.put("/usr/bin/dracut", "#!/bin/sh\n")
    g.put(
        "/etc/dracut.conf.d/10-xen.conf",
        'add_drivers+=" xen-blkfront xen-netfront "\nomit_drivers+=" nouveau "\n',
    )
    _f, _l, plan = plan_for(g)
    writes = {s.path: s.text for s in plan.steps if isinstance(s, Write)}  # type: ignore[attr-defined]
    assert writes["/etc/dracut.conf.d/10-xen.conf"] == 'add_drivers+=" "\nomit_drivers+=" nouveau "\n'
    ours = writes["/etc/dracut.conf.d/90-vimgtools-kvm.conf"]
    assert (
        'force_drivers+=" virtio_pci virtio_blk virtio_scsi virtio_net ext4 "' in ours
        and 'hostonly="no"' in ours
    )
    cmds = [s.argv for s in plan.steps if isinstance(s, RunCommand)]  # type: ignore[attr-defined]
    assert cmds[0] == ("/usr/bin/dracut", "-f", f"/boot/initramfs-{OLD}.img", OLD)


def test_generic_mbr_code_is_replaced_by_the_guests_loader() -> None:
    """parted writes a generic MBR that chains to the active partition, which pygrub guests leave empty."""
    generic = b"\xfa\xb8\x00\x10\x8e\xd0" + bytes(504) + b"\x55\xaa"
    _f, _l, plan = plan_for(xen_debian(mbr=generic))
    checks = {c.name: c for c in plan.checks}  # type: ignore[attr-defined]
    assert checks["boot-code"].ok and "other boot code, not grub2's" in checks["boot-code"].message
    assert any(isinstance(s, RunCommand) and "grub-install" in s.argv[-1] for s in plan.steps)  # type: ignore[attr-defined]
    _f, _l, plan = plan_for(xen_debian(mbr=GRUB_MBR))
    assert not any(isinstance(s, RunCommand) and "grub-install" in s.argv[-1] for s in plan.steps)  # type: ignore[attr-defined]


def test_extlinux_boot_code_goes_to_the_disk_the_chroot_mounts() -> None:
    """syslinux's mbr.bin: dd to the disk /proc/mounts names in the chroot, never a fixed /dev/sda
    (inside the appliance the kernel does not always name the guest's disk sda)."""
    g = xen_debian()
    for f in ("/usr/sbin/update-grub", "/usr/sbin/grub-install", "/usr/bin/grub-editenv"):
        g.rm_f(f)
    g.rm_rf("/boot/grub")
    g.put(
        "/boot/extlinux/extlinux.conf",
        f"DEFAULT debian\nLABEL debian\n    KERNEL /boot/vmlinuz-{OLD}\n    INITRD /boot/initrd.img-{OLD}\n"
        "    APPEND root=/dev/xvda1 ro console=hvc0\n",
    )
    g.put("/usr/bin/extlinux", "#!/bin/sh\n")
    g.put("/usr/lib/syslinux/mbr/mbr.bin", bytes(440))
    _f, loader, plan = plan_for(g)
    assert loader.name == "extlinux"  # type: ignore[attr-defined]
    cmds = [s.argv for s in plan.steps if isinstance(s, RunCommand)]  # type: ignore[attr-defined]
    assert ("/usr/bin/extlinux", "--install", "/boot/extlinux") in cmds
    (dd,) = [a for a in cmds if a[0] == "/bin/sh" and "mbr.bin" in a[2]]
    assert "/proc/mounts" in dd[2] and 'dd if=/usr/lib/syslinux/mbr/mbr.bin of="$d" bs=440' in dd[2]
    assert "of=/dev/sda" not in dd[2]


FAKE_LSBLK = """#!/bin/sh
# lsblk -lnsp -o NAME,TYPE DEV, as util-linux prints it for a logical volume on /dev/sdb2
[ "$1 $2 $3 $4" = "-lnsp -o NAME,TYPE /dev/mapper/vg-root" ] || { echo "unexpected: $*" >&2; exit 1; }
printf '/dev/mapper/vg-root lvm\\n/dev/sdb2   part\\n/dev/sdb    disk\\n'
"""


@pytest.mark.parametrize(
    ("mounts", "disk"),
    [
        ("/dev/sda1 / ext4 rw 0 0\n", "/dev/sda"),
        ("/dev/sdb2 / ext4 rw 0 0\n/dev/sdb1 /boot ext4 rw 0 0\n", "/dev/sdb"),
        ("/dev/nvme0n1p2 / ext4 rw 0 0\n", "/dev/nvme0n1"),
        ("/dev/mapper/vg-root / ext4 rw 0 0\n/dev/sda1 /boot ext2 rw 0 0\n", "/dev/sda"),
        ("/dev/mapper/vg-root / ext4 rw 0 0\n", "/dev/sdb"),  # a root on LVM, no /boot of its own
    ],
)
def test_the_boot_disk_as_the_chroot_names_it(tmp_path: Path, mounts: str, disk: str) -> None:
    """The shell that finds the disk grub-install / mbr.bin go to, run here on a mounts table (lsblk
    faked with what util-linux prints for a logical volume)."""
    table = tmp_path / "mounts"
    table.write_text(mounts)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "lsblk").write_text(FAKE_LSBLK)
    (bindir / "lsblk").chmod(0o755)
    out = subprocess.run(
        ["/bin/sh", "-c", boot_disk_sh(str(table)) + 'echo "$d"'],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"},
    )
    assert out.stdout.strip() == disk, out.stderr
