"""Two Debian 12 guests sharing one read-only system disk, set up as such guests were on a Xen host.

Cached beside guestbuild's products in ``$VIMG_TEST_CACHE``, keyed by a hash of the builder code
here and of guestbuild's and xenbuild's keys it derives from. Run it by hand to warm the cache::

    python tests/rekernel/sharedbuild.py

``shared_system()`` -> (SYSTEM, ROOT1, ROOT2), raw images made from guestbuild's debootstrap tree
in one libguestfs launch. Each guest sees its own ROOT first (``xvda``) and SYSTEM second (``xvdb``):

- SYSTEM: an MBR with syslinux's ``mbr.bin``; partition 1 (active), ext4 ``sysboot``: every guest's
  ``/boot``: the tree's kernel, an initramfs carrying only xen-blkfront, xen-netfront and ext4 (made
  on the host in a chroot, ``xenbuild._mkinitramfs``), ``/boot/extlinux/extlinux.conf`` with
  ``APPEND root=/dev/xvda1 ro console=hvc0 quiet``, extlinux in its boot sector; partition 2, ext4
  ``sysusr``: every guest's ``/usr`` (usrmerged, so ``/lib/modules`` is ``/usr/lib/modules``, a real
  directory here). The old kernel's module tree is pruned of drivers no VM uses (``PRUNED``) to keep
  the test's copies small.
- ROOT1, ROOT2: an MBR without boot code, partition 1 ext4 (own UUIDs): the tree without the
  contents of ``/usr`` and ``/boot``; ``/etc/fstab`` with ``/dev/xvda1 /``, ``/dev/xvdb1 /boot`` and
  ``/dev/xvdb2 /usr`` (both ``ro,noload``); ``serial-getty@hvc0`` enabled; ``enX0`` in
  ``/etc/network/interfaces``; hostnames ``vimg-guest1`` / ``vimg-guest2``; the report unit
  (``REPORT_SCRIPT``, on ttyS0): the guest, the kernel, where ``/``, ``/usr``, ``/boot`` and
  ``/lib/modules`` come from, ``modprobe dummy`` and the file it came from, the NICs, the drivers
  udev wanted that are neither loaded nor built in; then it powers off.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import guestbuild
import xenbuild

SYSTEM_SIZE = 2 << 30
SYSBOOT_SIZE = 1 << 30
ROOT_SIZE = 768 << 20
GUESTS = ("vimg-guest1", "vimg-guest2")
PRUNED = ("drivers/gpu", "drivers/media", "drivers/net/wireless", "drivers/infiniband", "drivers/staging",
          "drivers/isdn", "drivers/iio", "sound")  # fmt: skip

REPORT_SCRIPT = r"""#!/bin/sh
# vimgtools shared-system test guest: report on the serial console, then power off.
exec >/dev/ttyS0 2>&1
udevadm settle -t 30 || true
echo "VIMG-GUEST=$(cat /etc/hostname)"
echo "VIMG-KERNEL=$(uname -r)"
echo "VIMG-ROOT=$(findmnt -n -o SOURCE /)"
echo "VIMG-USR=$(findmnt -n -o SOURCE,OPTIONS /usr | tr -s ' ' ' ')"
echo "VIMG-BOOT=$(findmnt -n -o SOURCE /boot || echo none)"
echo "VIMG-MODULES-LINK=$(readlink /usr/lib/modules) -> $(readlink -f /lib/modules/$(uname -r))"
if modprobe dummy; then
    F=$(readlink -f "$(modinfo -n dummy)")
    echo "VIMG-MODULE=dummy loaded=$(test -d /sys/module/dummy && echo yes || echo no) file=$F"
else
    echo "VIMG-MODULE=dummy loaded=no file=none"
fi
echo "VIMG-NICS=$(ls /sys/class/net | tr '\n' ' ')"
BUILTIN=/lib/modules/$(uname -r)/modules.builtin
CANDIDATES=$(cat /sys/bus/*/devices/*/modalias 2>/dev/null | sort -u | while read -r a; do
    modprobe -R "$a" 2>/dev/null; done | tr - _ | sort -u | while read -r m; do
    [ -d "/sys/module/$m" ] && continue
    grep -q "/$m.ko" "$BUILTIN" 2>/dev/null && continue
    grep -q "/$(echo "$m" | tr _ -).ko" "$BUILTIN" 2>/dev/null && continue
    echo "$m"; done)
MISSED=""
for m in $CANDIDATES; do
    if modprobe -q "$m" 2>/dev/null && [ -d "/sys/module/$m" ]; then MISSED="$MISSED $m"; fi
done
echo "VIMG-UNLOADED=$(echo $MISSED | wc -w) $MISSED"
echo "VIMG-CMDLINE=$(cat /proc/cmdline)"
echo "VIMG-DONE"
sync
systemctl poweroff --no-block
"""

FSTAB = """# guest on a Xen host, sharing a read-only system disk (xvdb)
/dev/xvda1 / ext4 errors=remount-ro 0 1
/dev/xvdb1 /boot ext4 ro,noload 0 0
/dev/xvdb2 /usr ext4 ro,noload 0 0
"""


def extlinux_conf(version: str) -> str:
    return (
        "SERIAL 0 115200\nDEFAULT debian\nTIMEOUT 1\nPROMPT 0\n\n"
        "LABEL debian\n"
        f"    MENU LABEL Debian GNU/Linux, kernel {version}\n"
        f"    KERNEL /vmlinuz-{version}\n"
        f"    INITRD /initrd.img-{version}\n"
        "    APPEND root=/dev/xvda1 ro console=hvc0 quiet\n"
    )


def shared_key() -> str:
    return guestbuild._key(
        guestbuild.tree_key(),
        xenbuild._mkinitramfs,
        xenbuild.XEN_MODULES,
        _fill,
        _guest_files,
        shared_system,
        extlinux_conf,
        REPORT_SCRIPT,
        FSTAB,
        PRUNED,
        SYSTEM_SIZE,
        ROOT_SIZE,
    )


def _guest_files(g: Any, name: str) -> None:
    """A guest's own files, on its root (mounted at /)."""
    g.write("/etc/fstab", FSTAB)
    g.write("/etc/hostname", name + "\n")
    g.write("/etc/systemd/system/vimg-report.service", guestbuild.REPORT_UNIT)
    g.mkdir_p("/etc/systemd/system/multi-user.target.wants")
    g.ln_sf(
        "/etc/systemd/system/vimg-report.service",
        "/etc/systemd/system/multi-user.target.wants/vimg-report.service",
    )
    # ttyS0 is the report's (a getty there would vhangup it); the Xen console's getty is enabled.
    g.ln_sf("/dev/null", "/etc/systemd/system/serial-getty@ttyS0.service")
    g.mkdir_p("/etc/systemd/system/getty.target.wants")
    g.ln_sf(
        "/lib/systemd/system/serial-getty@.service",
        "/etc/systemd/system/getty.target.wants/serial-getty@hvc0.service",
    )
    g.mkdir_p("/etc/network")
    g.write(
        "/etc/network/interfaces",
        f"auto lo\niface lo inet loopback\n\nauto {xenbuild.NIC}\niface {xenbuild.NIC} inet dhcp\n",
    )


def _fill(g: Any, root_tar: Path, usr_tar: Path, tree: Path, version: str, xen_initrd: Path) -> None:
    boot_end = 2048 + SYSBOOT_SIZE // 512 - 1
    g.part_init("/dev/sda", "mbr")
    g.part_add("/dev/sda", "p", 2048, boot_end)
    g.part_add("/dev/sda", "p", boot_end + 1, -2048)
    g.part_set_bootable("/dev/sda", 1, True)
    g.mkfs("ext4", "/dev/sda1", label="sysboot", features="^64bit,^metadata_csum")
    g.mkfs("ext4", "/dev/sda2", label="sysusr")
    for i, dev in enumerate(("/dev/sdb", "/dev/sdc")):
        g.part_init(dev, "mbr")
        g.part_add(dev, "p", 2048, -2048)
        g.mkfs("ext4", f"{dev}1", label=f"guest{i + 1}root")
    for i, name in enumerate(GUESTS):
        g.mount(f"/dev/sd{'bc'[i]}1", "/")
        g.tar_in(str(root_tar), "/", xattrs=True)
        _guest_files(g, name)
        if i == 0:
            # The shared disk, filled through the first guest's view of it.
            g.mount("/dev/sda2", "/usr")
            g.tar_in(str(usr_tar), "/usr", xattrs=True)
            g.write("/usr/local/sbin/vimg-report", REPORT_SCRIPT)
            g.chmod(0o755, "/usr/local/sbin/vimg-report")
            g.mount("/dev/sda1", "/boot")
            for f in ("vmlinuz", "config", "System.map"):
                g.upload(str(tree / "boot" / f"{f}-{version}"), f"/boot/{f}-{version}")
            g.upload(str(xen_initrd), f"/boot/initrd.img-{version}")
            g.mkdir_p("/boot/extlinux")
            g.write("/boot/extlinux/extlinux.conf", extlinux_conf(version))
            g.command(["extlinux", "--install", "/boot/extlinux"])
            mbr = g.read_file("/usr/lib/syslinux/mbr/mbr.bin")
            g.sync()
            g.umount("/boot")
            g.umount("/usr")
        g.sync()
        g.umount_all()
    g.pwrite_device("/dev/sda", mbr[:440], 0)


def shared_system() -> tuple[Path, Path, Path]:
    """(SYSTEM, ROOT1, ROOT2), raw, cached; copy them before changing them."""
    names = ("system.raw", "root1.raw", "root2.raw")
    paths = tuple(guestbuild.cached(n, shared_key()) for n in names)
    done = guestbuild.cached("shared.done", shared_key())
    with guestbuild.locked("image-shared"):
        if done.exists():
            return paths  # type: ignore[return-value]
        tree = guestbuild.debootstrap_tree()
        version = guestbuild.guest_kernel_version(tree)
        paths[0].parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=guestbuild.CACHE) as tmp:
            t = Path(tmp)
            xen_initrd = t / f"initrd.img-{version}"
            xenbuild._mkinitramfs(version, xenbuild.XEN_MODULES, xen_initrd)
            root_tar, usr_tar = t / "root.tar", t / "usr.tar"
            guestbuild.run(
                "tar", "-C", tree, "--numeric-owner", "--xattrs", "-cf", root_tar,
                "--exclude=./usr/*", "--exclude=./boot/*", ".",
            )  # fmt: skip
            prune = [f"--exclude=./lib/modules/{version}/kernel/{p}" for p in PRUNED]
            guestbuild.run(
                "tar", "-C", tree / "usr", "--numeric-owner", "--xattrs", "-cf", usr_tar, *prune, "."
            )
            for p, size in zip(paths, (SYSTEM_SIZE, ROOT_SIZE, ROOT_SIZE), strict=True):
                p.unlink(missing_ok=True)
                with open(p, "wb") as f:
                    f.truncate(size)
            from vimgtools.guest.bindings import load_guestfs

            g = load_guestfs().GuestFS(python_return_dict=True)
            try:
                for p in paths:
                    g.add_drive_opts(str(p), format="raw", readonly=False)
                g.launch()
                _fill(g, root_tar, usr_tar, tree, version, xen_initrd)
                g.shutdown()
            finally:
                g.close()
        done.touch()
    return paths  # type: ignore[return-value]


def copy_all(dst: Path) -> tuple[Path, Path, Path]:
    """Fresh sparse copies of (SYSTEM, ROOT1, ROOT2) in ``dst``."""
    out = []
    for src in shared_system():
        subprocess.run(["cp", "--sparse=always", str(src), str(dst / src.name)], check=True)
        out.append(dst / src.name)
    return out[0], out[1], out[2]


if __name__ == "__main__":
    print(shared_system())
    print(xenbuild.kvm_cloud_bootdir())
