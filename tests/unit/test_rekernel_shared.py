"""The shared-system-disk planner (rekernel.shared) on plain data: where each change lands, the refusals."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import pytest
from kernelhelp import bzimage

import vimgtools.rekernel.session as session_mod
from vimgtools.boot import detect
from vimgtools.errors import BootloaderError, GuestError, InvalidInput, KernelError
from vimgtools.guest.facts import GuestFacts
from vimgtools.guest.fake import FakeGuest, Handler
from vimgtools.guest.inventory import Filesystem, Inventory
from vimgtools.guest.steps import Mkdir, MountView, RunCommand, Upload, Write
from vimgtools.kernel import Kernel, find_kernel
from vimgtools.rekernel.__main__ import main
from vimgtools.rekernel.apply import run_step
from vimgtools.rekernel.plan import STATE_FILE, Options, Plan
from vimgtools.rekernel.shared import (
    GENERIC_CONF,
    GuestState,
    View,
    cmdline_roots,
    find_view,
    generic_conf,
    guest_maps,
    plan_shared,
    resolve_spec,
    rollback_shared,
    shared_maps,
    verify_initramfs,
)

OLD = "6.1.0-50-amd64"
NEW = "6.1.0-56-cloud-amd64"
SYSTEM, R1, R2 = "system.img", "root1.img", "root2.img"
DISKS = {"/dev/sda": SYSTEM, "/dev/sdb": R1, "/dev/sdc": R2}
FS = {
    "/dev/sda1": Filesystem("/dev/sda1", "ext4", "b0000000-0000-0000-0000-000000000001", "sysboot"),
    "/dev/sda2": Filesystem("/dev/sda2", "ext4", "a0000000-0000-0000-0000-000000000002", "sysusr"),
    "/dev/sdb1": Filesystem("/dev/sdb1", "ext4", "11111111-0000-0000-0000-000000000000", "root"),
    "/dev/sdc1": Filesystem("/dev/sdc1", "ext4", "22222222-0000-0000-0000-000000000000", "root"),
}
FSTAB = "/dev/xvda1 / ext4 errors=remount-ro 0 1\n/dev/xvdb1 /boot ext4 ro,noload 0 0\n/dev/xvdb2 /usr ext4 ro 0 0\n"
CONF = (
    "DEFAULT debian\nLABEL debian\n    KERNEL /vmlinuz-{old}\n    INITRD /initrd.img-{old}\n"
    "    APPEND root={root} ro console=hvc0 quiet\n"
)
SYSLINUX_MBR = b"\x33\xc0\xfa" + bytes(507) + b"\x55\xaa"
HVC0 = "/etc/systemd/system/getty.target.wants/serial-getty@hvc0.service"


def state(
    disk: str,
    guest: str,
    *,
    root_spec: str = "/dev/xvda1",
    fstab: str = FSTAB,
    maps: tuple[tuple[str, str], ...] = (),
    **facts_kw: object,
) -> GuestState:
    root = disk + "1"
    mps = {"/": root, "/boot": "/dev/sda1", "/usr": "/dev/sda2"}
    files = {
        "/etc/fstab": fstab,
        "/boot/extlinux/extlinux.conf": CONF.format(old=OLD, root=root_spec),
        "/etc/network/interfaces": "auto enX0\niface enX0 inet dhcp\n",
        "/etc/initramfs-tools/initramfs.conf": "MODULES=most\n",
    }
    base: dict[str, object] = {
        "root": root,
        "arch": "x86_64",
        "distro": "debian",
        "product": "Debian 12",
        "mountpoints": mps,
        "fs_types": dict.fromkeys(mps, "ext4"),
        "boot_separate": True,
        "lib_is_link": True,
        "modules_path": "/usr/lib/modules",
        "modules_on_boot": False,
        "module_versions": {OLD: 200 << 20},
        "boot_kernels": [OLD],
        "boot_free": 900 << 20,
        "boot_sector": SYSLINUX_MBR,
        "files": files,
        "tools": {"/usr/bin/extlinux", "/usr/sbin/update-initramfs", "/usr/sbin/mkinitramfs"},
    }
    base.update(facts_kw)
    facts = GuestFacts(**base)  # type: ignore[arg-type]
    inv = Inventory(
        disks=list(DISKS),
        partitions=list(FS),
        filesystems=dict(FS),
        files=dict(facts.files),
        getty_links={HVC0: "/lib/systemd/system/serial-getty@.service"},
        kernels={},
        boot_sectors={d: SYSLINUX_MBR for d in DISKS},
    )
    return GuestState(View(guest, disk, root, dict(facts.mountpoints), guest_maps(disk, maps)), facts, inv)


@pytest.fixture
def kernel(tmp_path: Path) -> Kernel:
    d = tmp_path / "boot"
    mods = d / "modules" / NEW / "kernel"
    mods.mkdir(parents=True)
    (d / f"vmlinuz-{NEW}").write_bytes(bzimage(NEW))
    (d / f"initrd.img-{NEW}").write_bytes(bytes(1 << 16))
    (d / f"config-{NEW}").write_text("CONFIG_VIRTIO_PCI=y\nCONFIG_VIRTIO_BLK=m\nCONFIG_SCSI_VIRTIO=m\n")
    for m in ("virtio_blk", "virtio_scsi", "virtio_net", "ext4", "xfs"):
        (mods / f"{m}.ko").write_bytes(bytes(10))
    return find_kernel(d)


KDIR = f"usr/lib/modules/{NEW}/kernel"
INITRD = [f"{KDIR}/{m}.ko" for m in ("virtio_blk", "virtio_scsi", "virtio_net", "ext4")]


def plan(
    states: list[GuestState],
    k: Kernel,
    *,
    initrd: list[str] = INITRD,
    conf: str = "MODULES=most\n",
    texts: dict[str, str] | None = None,
    generate: bool = False,
    maps: tuple[tuple[str, str], ...] = (),
) -> Plan:
    p, subplans = plan_shared(
        states,
        k,
        detect(states[0].facts),
        system=SYSTEM,
        disks=DISKS,
        previous=OLD,
        options=Options(regenerate_initramfs=generate),
        initrd_files=None if generate else initrd,
        initrd_texts=None if generate else {"conf/initramfs.conf": conf, **(texts or {})},
        maps=maps,
    )
    assert len(subplans) == len(states)
    assert {sp.initramfs for sp in subplans} == {"shared"}  # checked once, on the host (verify_initramfs)
    return p


def two() -> list[GuestState]:
    return [state("/dev/sdb", R1), state("/dev/sdc", R2)]


def test_each_change_lands_on_its_disk(kernel: Kernel) -> None:
    p = plan(two(), kernel)
    assert p.refusal() is None, p.describe()
    on: dict[str | None, list[str]] = {}
    for i, s in enumerate(p.steps):
        on.setdefault(p.where(i, s), []).append(s.describe())
    assert [s.guest for s in p.steps if isinstance(s, MountView)] == [R1, R2]
    assert on[None] == [s.describe() for s in p.steps if isinstance(s, MountView)]
    shared = on[SYSTEM]
    assert sum(d.startswith("copy") and "vmlinuz" in d for d in shared) == 1
    assert f"move /usr/lib/modules/{OLD} -> /boot/modules/{OLD}" in shared
    assert "ln -s /boot/modules /usr/lib/modules" in shared
    assert "run /usr/bin/extlinux --install /boot/extlinux  # reinstall the extlinux boot sector" in shared
    for guest in (R1, R2):
        own = on[guest]
        assert own[0] == "edit /etc/fstab" and f"rm -f {HVC0}  # a getty on a Xen console" in own
        assert "write /etc/systemd/network/10-vimgtools-enX0.link" in own
        assert "write /etc/systemd/system/vimgtools-boot-modules.service" in own
        assert not any("/boot" in d.split()[-1] or "/usr/" in d for d in own if not d.startswith("ln -s"))
    fstabs = [s for s in p.steps if isinstance(s, Write) and s.path == "/etc/fstab"]
    assert [f.text.split()[0] for f in fstabs] == [
        f"UUID={FS['/dev/sdb1'].uuid}",
        f"UUID={FS['/dev/sdc1'].uuid}",
    ]
    assert all(f"UUID={FS['/dev/sda2'].uuid} /usr" in f.text for f in fstabs)
    conf = next(s for s in p.steps if isinstance(s, Write) and s.path.endswith("extlinux.conf"))
    assert "APPEND root=/dev/vda1 ro console=tty0 console=ttyS0,115200 quiet" in conf.text
    assert {c["root"] for c in p.shared["cmdline_roots"]} == {"/dev/vda1"}
    d = p.to_dict()
    assert d["shared"]["modules_link"]["on"] == SYSTEM
    assert [s["disk"] for s in d["steps"]] == list(p.step_disks)
    assert "[on system.img]" in p.describe() and "[on root2.img]" in p.describe()


def refusal_names(p: Plan) -> set[str]:
    return {c.name for c in p.checks if not c.ok}


def test_a_guest_whose_usr_is_its_own_is_refused(kernel: Kernel) -> None:
    g2 = state("/dev/sdc", R2)
    g2 = dataclasses.replace(
        g2,
        facts=dataclasses.replace(
            g2.facts, mountpoints={"/": "/dev/sdc1", "/boot": "/dev/sda1", "/usr": "/dev/sdc2"}
        ),
    )
    p = plan([state("/dev/sdb", R1), g2], kernel)
    assert "shared-usr:root2.img" in refusal_names(p)
    err = p.refusal()
    assert isinstance(err, InvalidInput) and "every guest must mount /usr from system.img" in str(err)


def test_a_host_only_initramfs_or_one_without_a_driver_is_refused(kernel: Kernel) -> None:
    p = plan(two(), kernel, conf="MODULES=dep\n")
    assert refusal_names(p) == {"initramfs-generic"} and isinstance(p.refusal(), KernelError)
    p = plan(two(), kernel, initrd=INITRD[:2])
    assert refusal_names(p) == {"initramfs-drivers:root1.img", "initramfs-drivers:root2.img"}
    assert "lacks ext4" in str(p.refusal()) and "--regenerate-initramfs" in str(p.refusal())
    # Checked as a generated one is after it is made: for this kernel, no Xen disk name baked in.
    p = plan(two(), kernel, initrd=[f.replace(NEW, OLD) for f in INITRD])
    assert refusal_names(p) == {"initramfs-version"}
    p = plan(two(), kernel, texts={"conf/conf.d/resume": "RESUME=/dev/xvda2\n"})
    assert refusal_names(p) == {"initramfs-config"} and "conf/conf.d/resume" in str(p.refusal())
    assert "initramfs supplied" in p.describe() and "(supplied, checked on the host)" in p.describe()


def test_a_root_uuid_of_one_guest_cannot_serve_the_other(kernel: Kernel) -> None:
    spec = f"UUID={FS['/dev/sdb1'].uuid}"
    p = plan([state("/dev/sdb", R1, root_spec=spec), state("/dev/sdc", R2, root_spec=spec)], kernel)
    assert refusal_names(p) == {"cmdline-root:root2.img"}
    assert "needs root=/dev/vdaN" in str(p.refusal())
    # A LABEL every guest's root carries serves them all.
    p = plan(
        [state("/dev/sdb", R1, root_spec="LABEL=root"), state("/dev/sdc", R2, root_spec="LABEL=root")], kernel
    )
    assert p.refusal() is None


def test_grub2_on_the_shared_boot_and_a_guest_with_its_own_modules_are_refused(kernel: Kernel) -> None:
    grub = {"/boot/grub/grub.cfg": f"menuentry 'x' {{\n linux /vmlinuz-{OLD} root=/dev/xvda1\n}}\n"}
    states = [
        dataclasses.replace(
            s,
            facts=dataclasses.replace(
                s.facts, files=grub | {"/etc/fstab": FSTAB}, tools={"/usr/sbin/update-grub"}
            ),
        )
        for s in two()
    ]
    p = plan(states, kernel)
    assert "loader" in refusal_names(p)
    assert any(c.refuses_as is BootloaderError and "update-grub" in c.message for c in p.checks if not c.ok)
    # /lib/modules a link of the guest's own into the shared /usr: neither place a link can go.
    g2 = state("/dev/sdc", R2, modules_path="/usr/lib/modules", lib_is_link=False)
    p = plan([state("/dev/sdb", R1), g2], kernel)
    assert refusal_names(p) == {"modules-link:root2.img"}
    assert "/lib/modules on the guest's own root" in str(p.refusal())


HD_FSTAB = (
    "/dev/hda1 / ext4 errors=remount-ro 0 1\n/dev/hdb1 /boot ext4 ro,noload 0 0\n/dev/hdb2 /usr ext4 ro 0 0\n"
)


def test_map_names_each_guests_disks_as_it_sees_them(kernel: Kernel) -> None:
    """Guests whose fstab and shared command line say hda/hdb: --map /dev/hda=/dev/sda (its ROOT)
    /dev/hdb=/dev/sdb (the system disk); without it they are refused, pointing at --map."""
    maps = shared_maps(["/dev/hda=/dev/sda", "/dev/hdb=/dev/xvdb"])
    assert maps == (("/dev/hda", "/dev/vda"), ("/dev/hdb", "/dev/vdb"))
    states = [
        state(d, g, root_spec="/dev/hda1", fstab=HD_FSTAB, maps=maps)
        for d, g in (("/dev/sdb", R1), ("/dev/sdc", R2))
    ]
    p = plan(states, kernel, maps=maps)
    assert p.refusal() is None, p.describe()
    fstabs = {
        p.where(i, s): s.text
        for i, s in enumerate(p.steps)
        if isinstance(s, Write) and s.path == "/etc/fstab"
    }
    for guest, dev in ((R1, "/dev/sdb1"), (R2, "/dev/sdc1")):
        assert [ln.split()[:2] for ln in fstabs[guest].splitlines()] == [
            [f"UUID={FS[dev].uuid}", "/"],
            [f"UUID={FS['/dev/sda1'].uuid}", "/boot"],
            [f"UUID={FS['/dev/sda2'].uuid}", "/usr"],
        ]
    conf = next(s for s in p.steps if isinstance(s, Write) and s.path.endswith("extlinux.conf"))
    assert "APPEND root=/dev/vda1 ro console=tty0 console=ttyS0,115200 quiet" in conf.text
    checks = {c.name: c for c in p.checks}
    assert checks["cmdline-root:root1.img"].ok and checks["cmdline-root:root2.img"].ok
    assert "  --map /dev/hda -> /dev/vda (each guest's ROOT)" in p.describe()
    assert p.shared["maps"] == {
        "/dev/hda": "/dev/vda (each guest's ROOT)",
        "/dev/hdb": "/dev/vdb (each guest's system disk)",
    }
    # Without --map: hda names nothing a guest has.
    bare = [
        state(d, g, root_spec="/dev/hda1", fstab=HD_FSTAB) for d, g in (("/dev/sdb", R1), ("/dev/sdc", R2))
    ]
    p = plan(bare, kernel)
    # Each guest's own fstab (root:, the retarget's) and the shared command lines (cmdline-root:).
    assert refusal_names(p) == {
        f"{check}:{root}"
        for check in ("root", "cmdline-root", "devices")
        for root in ("root1.img", "root2.img")
    }
    assert "root=/dev/hda1 names nothing there" in str(p.refusal()) and "--map OLD=/dev/sda" in str(
        p.refusal()
    )
    with pytest.raises(
        InvalidInput, match=r"--map /dev/hda=/dev/sdc: with --guest NEW is one of the two disks"
    ):
        shared_maps(["/dev/hda=/dev/sdc"])
    with pytest.raises(InvalidInput, match="OLD=NEW"):
        shared_maps(["hda"])


def test_resolve_spec_in_one_guests_view() -> None:
    maps, mine = guest_maps("/dev/sdc"), {"/dev/sdc", "/dev/sda"}
    assert resolve_spec("/dev/xvda1", maps, FS, mine) == "/dev/sdc1"
    assert resolve_spec("/dev/vdb2", maps, FS, mine) == "/dev/sda2"
    assert resolve_spec(f"UUID={FS['/dev/sdb1'].uuid}", maps, FS, mine) is None  # the other guest's
    assert resolve_spec("LABEL=root", maps, FS, mine) == "/dev/sdc1"
    assert resolve_spec("LABEL=root", maps, FS, {"/dev/sdb", "/dev/sdc"}) is None  # two of them
    assert resolve_spec("/dev/xvdc1", maps, FS, mine) is None
    assert cmdline_roots(
        {"/boot/extlinux/extlinux.conf": "  APPEND root=/dev/vda1 ro\n# APPEND root=x\n"}
    ) == [("/boot/extlinux/extlinux.conf", "/dev/vda1")]


def test_find_view_mounts_what_the_fstab_names() -> None:
    g = FakeGuest(image="appliance", roots=["/dev/sdb1", "/dev/sdc1"], filesystems={d: "ext4" for d in FS})
    g.put("/etc/fstab", FSTAB + "/dev/xvda9 /srv ext4 nofail 0 2\n")
    v = find_view(g, g.roots(), R2, "/dev/sdc", FS)
    assert v.root == "/dev/sdc1" and v.mountpoints == {
        "/": "/dev/sdc1",
        "/boot": "/dev/sda1",
        "/usr": "/dev/sda2",
    }
    g.put("/etc/fstab", FSTAB + "/dev/xvdc1 /data ext4 defaults 0 2\n")
    with pytest.raises(
        InvalidInput, match=r"root2.img: /etc/fstab: /dev/xvdc1 \(/data\) names no filesystem"
    ):
        find_view(g, g.roots(), R2, "/dev/sdc", FS)
    with pytest.raises(InvalidInput, match=r"root3\.img: no operating system found"):
        find_view(g, g.roots(), "root3.img", "/dev/sdd", FS)
    g.put("/etc/fstab", HD_FSTAB)
    with pytest.raises(InvalidInput, match=r"/dev/hdb1 \(/boot\) names no filesystem"):
        find_view(g, g.roots(), R2, "/dev/sdc", FS)
    v = find_view(g, g.roots(), R2, "/dev/sdc", FS, shared_maps(["/dev/hda=/dev/sda", "/dev/hdb=/dev/sdb"]))
    assert v.mountpoints == {"/": "/dev/sdc1", "/boot": "/dev/sda1", "/usr": "/dev/sda2"}


def test_cli_usage_errors_exit_2_before_any_change(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    disks = [tmp_path / n for n in (SYSTEM, R1, R2)]
    for d in disks:
        d.write_bytes(bytes(4096))
    boot = tmp_path / "boot"
    (boot / "modules" / NEW / "kernel").mkdir(parents=True)
    (boot / "modules" / NEW / "kernel" / "ext4.ko").write_bytes(bytes(10))
    (boot / f"vmlinuz-{NEW}").write_bytes(bzimage(NEW))
    s, r1, r2 = map(str, disks)
    cases = {
        "--guest takes one DISK": [s, r1, "--from", str(boot), "--guest", r2],
        "--guest needs --from": [s, "--guest", r1],
        "--rollback takes no --from": [s, "--from", str(boot), "--guest", r1, "--rollback"],
        "--boot-check not supported with a shared system disk": [
            *(s, "--from", str(boot), "--guest", r1, "--boot-check"),
        ],
        "--guest: --initramfs, --root not supported": [
            *(s, "--from", str(boot), "--guest", r1, "--initramfs", r2, "--root", "/dev/sdb1"),
        ],
        "--guest: the disks are committed together only when raw": [
            *(s, "--from", str(boot), "--guest", r1, "--format", "qcow2"),
        ],
        "no initramfs, and --no-regenerate-initramfs": [
            *(s, "--from", str(boot), "--guest", r1, "--no-regenerate-initramfs"),
        ],
        "a DISK is given twice": [s, "--from", str(boot), "--guest", r1, "--guest", r1],
        "--map /dev/hda=/dev/sdc: with --guest NEW is one of the two disks each guest sees": [
            *(s, "--from", str(boot), "--guest", r1, "--map", "/dev/hda=/dev/sdc"),
        ],
    }
    for message, argv in cases.items():
        assert main(argv) == 2, message
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("vimgtools.rekernel: error: ") and message in err[0], err
    assert all(d.read_bytes() == bytes(4096) for d in disks)


# -- a generic initramfs generated in the first guest's view --------------------------------------
def xfs_guest(disk: str, guest: str) -> GuestState:
    g = state(disk, guest)
    return dataclasses.replace(
        g, facts=dataclasses.replace(g.facts, fs_types={"/": "xfs", "/boot": "ext4", "/usr": "ext4"})
    )


def test_the_generated_initramfs_lands_on_system_in_the_first_guests_view(kernel: Kernel) -> None:
    p = plan([state("/dev/sdb", R1), xfs_guest("/dev/sdc", R2)], kernel, generate=True)
    assert p.refusal() is None, p.describe()
    assert p.initramfs == "regenerate:mkinitramfs"
    # virtio_pci is built in (the config says y); the second guest's root is xfs.
    assert p.initramfs_modules == ("virtio_blk", "virtio_scsi", "ext4", "xfs")
    out = f"/boot/initrd.img-{NEW}"
    made = [(i, s) for i, s in enumerate(p.steps) if GENERIC_CONF in s.describe()]
    assert [type(s) for _i, s in made] == [Mkdir, Write, Write, RunCommand]
    assert {p.where(i, s) for i, s in made} == {SYSTEM}
    mk = made[-1][1]
    assert isinstance(mk, RunCommand) and mk.argv == (
        "/usr/sbin/mkinitramfs",
        "-d",
        GENERIC_CONF,
        "-o",
        out,
        NEW,
    )
    views = [i for i, s in enumerate(p.steps) if isinstance(s, MountView)]
    modules_in = next(i for i, s in enumerate(p.steps) if s.describe().startswith("copy modules"))
    # In the first guest's view, once its modules resolve through the link; never in the second's.
    assert views[0] < modules_in < made[0][0] and made[-1][0] < views[1]
    assert sum(isinstance(s, RunCommand) and "mkinitramfs" in s.argv[0] for s in p.steps) == 1
    assert not any(isinstance(s, Upload) and "initrd" in s.dst for s in p.steps), "BOOTDIR's is not used"
    conf, modules = (s.text for _i, s in made[1:3] if isinstance(s, Write))
    assert "MODULES=list\n" in conf and "MODULES=most" not in conf and "RESUME=none\n" in conf
    assert modules.splitlines()[1:] == list(p.initramfs_modules)
    checks = {c.name: c for c in p.checks}
    assert checks["initramfs-tool"].ok and checks["config"].ok
    assert (
        "(virtio_blk, virtio_scsi, xfs, ext4) go into the generated initramfs"
        in checks["initramfs-drivers:root2.img"].message
    )
    info = p.shared["initramfs"]
    assert info["source"] == "generated" and info["in_view_of"] == R1 and info["path"] == out
    assert info["not_used"].endswith(f"initrd.img-{NEW} (--regenerate-initramfs)")
    assert f"initramfs for every guest: generated by mkinitramfs in the view of {R1}" in p.describe()
    # Each guest's loader entry boots it: the extlinux label names the initramfs.
    *_, label = (s for s in p.steps if isinstance(s, Write) and s.path.endswith("extlinux.conf"))
    assert f"INITRD /initrd.img-{NEW}" in label.text


def test_a_host_only_supplied_initramfs_is_replaced_when_asked(kernel: Kernel) -> None:
    """The supplied one is MODULES=dep: refused, unless --regenerate-initramfs (then it is not used)."""
    assert refusal_names(plan(two(), kernel, conf="MODULES=dep\n")) == {"initramfs-generic"}
    p = plan(two(), kernel, conf="MODULES=dep\n", generate=True)
    assert p.refusal() is None and p.initramfs == "regenerate:mkinitramfs"


def test_generating_is_refused_without_a_tool_a_config_or_a_driver(tmp_path: Path, kernel: Kernel) -> None:
    no_tool = [
        dataclasses.replace(s, facts=dataclasses.replace(s.facts, tools={"/usr/bin/extlinux"})) for s in two()
    ]
    p = plan(no_tool, kernel, generate=True)
    assert refusal_names(p) == {"initramfs-tool"} and "put a generic one in BOOTDIR" in str(p.refusal())
    bare = dataclasses.replace(kernel, config=None)
    p = plan(two(), bare, generate=True)
    assert refusal_names(p) == {"config"} and f"put config-{NEW} in BOOTDIR" in str(p.refusal())
    no_xfs = dataclasses.replace(kernel, module_names=kernel.module_names - {"xfs"})
    p = plan([state("/dev/sdb", R1), xfs_guest("/dev/sdc", R2)], no_xfs, generate=True)
    assert refusal_names(p) == {"initramfs-drivers:root2.img"}
    assert "xfs (CONFIG_XFS_FS not in" in str(p.refusal())


def test_a_dracut_guest_generates_with_no_hostonly(kernel: Kernel) -> None:
    states = [
        dataclasses.replace(
            s, facts=dataclasses.replace(s.facts, tools={"/usr/bin/extlinux", "/usr/bin/dracut"})
        )
        for s in two()
    ]
    p = plan(states, kernel, generate=True)
    assert p.refusal() is None, p.describe()
    (mk,) = [s for s in p.steps if isinstance(s, RunCommand) and "dracut" in s.argv[0]]
    assert mk.argv == (
        "/usr/bin/dracut", "--force", "--no-hostonly", "--no-hostonly-cmdline",
        "--force-drivers", "virtio_blk virtio_scsi ext4", f"/boot/initrd.img-{NEW}", NEW,
    )  # fmt: skip
    assert p.initramfs == "regenerate:dracut"


def test_generic_conf_keeps_the_guests_settings_but_not_its_modules_or_resume() -> None:
    text = generic_conf("# comment\nMODULES=dep\nCOMPRESS=xz\nRESUME=UUID=1234\nKEYMAP=n\n")
    body = [ln for ln in text.splitlines() if not ln.startswith("#")]
    assert body == ["COMPRESS=xz", "KEYMAP=n", "BUSYBOX=auto", "MODULES=list", "RESUME=none"]
    assert [ln for ln in generic_conf(None).splitlines() if not ln.startswith("#")] == [
        "BUSYBOX=auto", "COMPRESS=gzip", "MODULES=list", "RESUME=none",
    ]  # fmt: skip


def cpio_gz(tree: Path, out: Path) -> None:
    names = "\n".join(str(p.relative_to(tree)) for p in sorted(tree.rglob("*"))) + "\n"
    data = subprocess.run(
        ["cpio", "-o", "-H", "newc", "--quiet"],
        cwd=tree,
        input=names.encode(),
        capture_output=True,
        check=True,
    ).stdout
    out.write_bytes(subprocess.run(["gzip", "-c"], input=data, capture_output=True, check=True).stdout)


def mkinitramfs_as(tmp: Path, *, honour_list: bool) -> Handler:
    """A handler acting out mkinitramfs -d CONF -o OUT VER: a real gzip'd cpio with conf/initramfs.conf
    and the modules of CONF/modules (or, as MODULES=dep in the appliance would, only virtio_scsi)."""

    def handler(g: FakeGuest, argv: tuple[str, ...]) -> str:
        conf, out, ver = argv[argv.index("-d") + 1], argv[argv.index("-o") + 1], argv[-1]
        tree = tmp / "initramfs"
        (tree / "conf").mkdir(parents=True)
        (tree / "conf" / "initramfs.conf").write_text(g.text(f"{conf}/initramfs.conf") or "")
        listed = [m for m in (g.text(f"{conf}/modules") or "").splitlines() if m and not m.startswith("#")]
        kdir = tree / "usr/lib/modules" / ver / "kernel"
        kdir.mkdir(parents=True)
        for m in listed if honour_list else ["virtio_scsi"]:
            (kdir / f"{m}.ko").write_bytes(b"")
        cpio_gz(tree, tmp / "initrd")
        g.write(out, (tmp / "initrd").read_bytes())
        return ""

    return handler


@pytest.mark.parametrize("honour_list", [True, False])
def test_the_generated_initramfs_is_checked_on_the_host(
    tmp_path: Path, kernel: Kernel, honour_list: bool
) -> None:
    """Its steps run on a FakeGuest (the runner), then verify_initramfs reads what they made on the host;
    an initramfs made without the list (the appliance's own drivers) fails it."""
    states = [state("/dev/sdb", R1), xfs_guest("/dev/sdc", R2)]
    p = plan(states, kernel, generate=True)
    g = FakeGuest(image="appliance", roots=["/dev/sdb1", "/dev/sdc1"])
    g.handlers["mkinitramfs"] = mkinitramfs_as(tmp_path, honour_list=honour_list)
    facts = states[0].facts
    for s in p.steps:
        if GENERIC_CONF in s.describe():
            run_step(g, facts, detect(facts), s)
    assert g.text(f"{GENERIC_CONF}/modules") is not None
    if honour_list:
        got = verify_initramfs(g, states, kernel, "kvm", p)
        assert got["source"] == "generated" and got["drivers"] == list(p.initramfs_modules)
    else:
        with pytest.raises(
            GuestError,
            match=r"verify: the generated initramfs .*root1.img: the initramfs lacks virtio_blk, ext4",
        ):
            verify_initramfs(g, states, kernel, "kvm", p)
    g.rm_f(f"/boot/initrd.img-{NEW}")
    with pytest.raises(GuestError, match=f"initrd.img-{NEW} is missing on {SYSTEM}"):
        verify_initramfs(g, states, kernel, "kvm", p)


# -- guests without usrmerge: the modules link on each guest's own root ----------------------------
def own_lib(disk: str, guest: str, versions: dict[str, int] | None = None) -> GuestState:
    return state(
        disk,
        guest,
        modules_path="/lib/modules",
        lib_is_link=False,
        module_versions=versions if versions is not None else {OLD: 200 << 20},
    )


def landed(p: Plan) -> list[tuple[str | None, str]]:
    return [(p.where(i, s), s.describe()) for i, s in enumerate(p.steps)]


def test_without_usrmerge_each_guest_gets_the_link_on_its_own_root(kernel: Kernel) -> None:
    p = plan([own_lib("/dev/sdb", R1), own_lib("/dev/sdc", R2)], kernel)
    assert p.refusal() is None, p.describe()
    steps = landed(p)
    view2 = steps.index((None, next(d for w, d in steps if w is None and R2 in d)))
    first, second = steps[:view2], steps[view2:]
    # The first guest's tree goes to the shared /boot; the link is on its own root.
    assert (SYSTEM, f"move /lib/modules/{OLD} -> /boot/modules/{OLD}") in first
    assert (R1, "rmdir /lib/modules") in first and (R1, "ln -s /boot/modules /lib/modules") in first
    # The second guest's tree of the same version is kept on its own disk, never removed.
    kept = f"/lib/vimgtools-modules-kept/{OLD}"
    assert (R2, f"move /lib/modules/{OLD} -> {kept}") in second
    assert (R2, "rmdir /lib/modules") in second and (R2, "ln -s /boot/modules /lib/modules") in second
    assert not any(w == SYSTEM and d.startswith("move") for w, d in second)
    assert not any("/usr/lib/modules" in d for _w, d in steps), "the shared /usr is left alone"
    checks = {c.name: c for c in p.checks}
    assert checks["modules-link:root1.img"].ok and "the link /lib/modules -> /boot/modules goes there" in (
        checks["modules-link:root1.img"].message
    )
    assert checks[f"modules-kept:root2.img:{OLD}"].ok
    assert p.shared["modules_link"]["kept"] == [{"guest": R2, "version": OLD, "path": kept, "uses": R1}]
    assert p.shared["modules_link"]["guests"][R2]["link"] == f"/lib/modules on {R2}"
    assert "guest's module trees moved 200" in checks["space"].message  # the first one's only


def test_a_kept_tree_of_another_size_warns_and_a_guests_own_version_is_moved(kernel: Kernel) -> None:
    other = "6.1.0-40-amd64"
    g2 = own_lib("/dev/sdc", R2, {OLD: 150 << 20, other: 300 << 20})
    p = plan([own_lib("/dev/sdb", R1), g2], kernel)
    assert refusal_names(p) == {f"modules-kept:root2.img:{OLD}"}
    assert "its old kernel 6.1.0-50-amd64 would load root1.img's modules" in str(p.refusal())
    assert p.refusal(force=True) is None
    # A version only the second guest has goes to the shared /boot, in its view, and is counted.
    steps = landed(p)
    view2 = [i for i, (w, _d) in enumerate(steps) if w is None][1]
    assert (SYSTEM, f"move /lib/modules/{other} -> /boot/modules/{other}") in steps[view2:]
    space = next(c for c in p.checks if c.name == "space")
    assert "module trees moved 500," in space.message
    small = [
        dataclasses.replace(g, facts=dataclasses.replace(g.facts, boot_free=450 << 20))
        for g in (own_lib("/dev/sdb", R1), g2)
    ]
    assert "space" in refusal_names(plan(small, kernel))


@pytest.mark.parametrize("usrmerged_first", [True, False])
def test_usrmerged_and_not_side_by_side(kernel: Kernel, usrmerged_first: bool) -> None:
    """One guest takes /lib/modules from the shared /usr, the other has its own: two links; the
    shared one is made in the view of the usrmerged guest, whichever comes first."""
    merged, own = state("/dev/sdb", R1), own_lib("/dev/sdc", R2)
    if not usrmerged_first:
        merged, own = state("/dev/sdc", R2), own_lib("/dev/sdb", R1)
    states = [merged, own] if usrmerged_first else [own, merged]
    p = plan(states, kernel)
    assert p.refusal() is None, p.describe()
    steps = landed(p)
    views = [i for i, (w, _d) in enumerate(steps) if w is None]
    in_view = {
        states[k].view.guest: steps[views[k] : (views[k + 1] if k + 1 < len(views) else None)]
        for k in range(2)
    }
    m, o = merged.view.guest, own.view.guest
    assert (SYSTEM, "ln -s /boot/modules /usr/lib/modules") in in_view[m]
    assert (o, "ln -s /boot/modules /lib/modules") in in_view[o]
    moves = [(w, d) for w, d in steps if d.startswith("move ")]
    first_guest = states[0].view
    src = "/usr/lib/modules" if usrmerged_first else "/lib/modules"
    assert moves[0] == (SYSTEM, f"move {src}/{OLD} -> /boot/modules/{OLD}")
    later = "/lib/modules" if usrmerged_first else "/usr/lib/modules"
    assert moves[1] == (
        states[1].view.guest if usrmerged_first else SYSTEM,
        f"move {later}/{OLD} -> /lib/vimgtools-modules-kept/{OLD}",
    )
    assert first_guest.guest in {k["uses"] for k in p.shared["modules_link"]["kept"]}


# -- --rollback of a shared run, on the fake (one namespace serves both views: the guests' files match)
def shared_fake() -> FakeGuest:
    """SYSTEM and two ROOTs after a shared rekernel OLD -> NEW (extlinux, the state file on SYSTEM)."""
    g = FakeGuest(
        image="appliance",
        roots=["/dev/sdb1", "/dev/sdc1"],
        filesystems={d: "ext4" for d in FS},
        uuids={d: f.uuid for d, f in FS.items()},
        labels={d: f.label for d, f in FS.items()},
        disks=list(DISKS),
        devices={"/dev/sda": SYSLINUX_MBR},
    )
    g.put("/etc/fstab", FSTAB)
    g.put_link("/lib", "usr/lib")
    g.put_link("/usr/lib/modules", "/boot/modules")
    for v in (OLD, NEW):
        g.put(f"/boot/modules/{v}/modules.dep", "")
        g.put(f"/boot/vmlinuz-{v}", bzimage(v))
        g.put(f"/boot/initrd.img-{v}", b"initrd")
    append = "    APPEND root=/dev/vda1 ro console=tty0 console=ttyS0,115200 quiet\n"
    g.put(
        "/boot/extlinux/extlinux.conf",
        f"DEFAULT vimg-{NEW}\nLABEL vimg-{NEW}\n    KERNEL /vmlinuz-{NEW}\n    INITRD /initrd.img-{NEW}\n{append}"
        f"LABEL debian\n    KERNEL /vmlinuz-{OLD}\n    INITRD /initrd.img-{OLD}\n{append}",
    )
    g.put("/usr/bin/extlinux", "#!/bin/sh\n")
    g.put(
        STATE_FILE,
        json.dumps({"version": NEW, "previous": OLD, "loader": "extlinux", "tool": "vimgtools.rekernel"}),
    )
    return g


@pytest.fixture
def shared_disks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[FakeGuest, list[Path], list[list[Path]]]:
    d = tmp_path / "vm"
    d.mkdir()
    paths = [d / n for n in (SYSTEM, R1, R2)]
    for p in paths:
        p.write_bytes(bytes(1 << 20))
    g = shared_fake()
    committed: list[list[Path]] = []
    monkeypatch.setattr(session_mod, "open_image", lambda overlays: g)
    monkeypatch.setattr(
        session_mod, "commit_group", lambda members: committed.append([p for p, _ in members]) or [1, 0, 0]
    )
    return g, paths, committed


def test_rollback_of_a_shared_run_changes_system_only_verified_in_every_view(
    shared_disks: tuple[FakeGuest, list[Path], list[list[Path]]],
) -> None:
    g, (system, r1, r2), committed = shared_disks
    result = rollback_shared(system, [r1, r2])
    assert result.action == "rollback-shared" and result.committed
    assert committed == [[system, r1, r2]], "every disk in one group commit"
    assert result.plan is not None and (result.plan.previous, result.plan.version) == (NEW, OLD)
    assert [type(s).__name__ for s in result.plan.steps] == ["SetDefault", "Write"]
    assert set(result.plan.step_disks) == {str(system)}
    assert (g.text("/boot/extlinux/extlinux.conf") or "").startswith("DEFAULT debian\n")
    assert json.loads(g.text(STATE_FILE) or "")["version"] == OLD
    for root in (r1, r2):
        v = result.verified["guests"][str(root)]
        assert v["default_entry"]["kernel"] == f"/boot/vmlinuz-{OLD}" and "is /dev/sd" in v["root"]
    assert [c.name for c in result.plan.checks if c.name.startswith("cmdline-root:")] == [
        "cmdline-root:root1.img",
        "cmdline-root:root2.img",
    ]
    # And forward again: the state file names the other kernel now.
    g.closed = None
    assert (
        rollback_shared(system, [r1, r2]).verified["guests"][str(r1)]["default_entry"]["kernel"].endswith(NEW)
    )


def test_rollback_of_a_shared_run_refusals_and_dry_run(
    shared_disks: tuple[FakeGuest, list[Path], list[list[Path]]], capsys: pytest.CaptureFixture[str]
) -> None:
    g, (system, r1, r2), committed = shared_disks
    argv = ["--rollback", str(system), "--guest", str(r1), "--guest", str(r2)]
    assert main(["-n", *argv]) == 0
    out = capsys.readouterr().out
    assert "rollback-shared rehearsed (dry run, DISK unchanged)" in out and f"[on {system}]" in out
    assert committed == [], "a dry run commits nothing (its writes went to the overlays, thrown away)"
    g.closed = None
    g.rm_f(STATE_FILE)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"vimgtools.rekernel: error: {system}: preflight: state: no "), err
    assert committed == []
    assert main([*argv, "--from", "/nowhere"]) == 2
    assert "--rollback takes no --from" in capsys.readouterr().err
