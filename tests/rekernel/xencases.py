"""More Xen-shaped Debian 12 guests, for the cases of issue 13 the GRUB ones do not cover.

Derived from guestbuild's cached extlinux and NORD images, cached in ``$VIMG_TEST_CACHE`` keyed by
a hash of the builder code here and of guestbuild's and xenbuild's keys. Run it by hand to warm the
cache::

    python tests/rekernel/xencases.py

- ``xen_extlinux()``: the extlinux guest as pygrub booted it: ``/dev/xvda1`` in fstab,
  ``APPEND root=/dev/xvda1 ro console=hvc0 ...``, an initramfs with only xen-blkfront, xen-netfront
  and ext4, ``serial-getty@hvc0`` enabled, no boot code in the MBR (its partition's extlinux boot
  sector stays). Its console and network as xenbuild's guests have them: the ttyS0 getty not
  masked, ``enX0`` by DHCP through networkd, a stale vif rule, xenbuild's report on ttyS1.
- ``xen_extlinux_pv()``: that guest with a synthetic Xen PV-only kernel (``2.6.32-5-xen``: a boot
  header only, ``CONFIG_X86_64_XEN=y`` in its config) as the DEFAULT label, for the refusal.
- ``xen_partitionless()``: NORD's partitionless disk (ext4 from sector 0) as a Xen guest: fstab and
  ``root=`` name ``/dev/xvda``, ``console=hvc0``, and no boot code in sector 0, for the refusal.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import guestbuild
import xenbuild

PV_VERSION = "2.6.32-5-xen"


def key() -> str:
    return guestbuild._key(
        guestbuild.image_key(),
        xenbuild._mkinitramfs,
        xenbuild.XEN_MODULES,
        _xen_shaped,
        _console_and_network,
        xenbuild.XEN_REPORT_SCRIPT,
        xenbuild.NIC,
        xenbuild.VIF_MAC,
        _build,
        _pv_kernel,
        _add_pv,
        xen_extlinux,
        xen_extlinux_pv,
        xen_partitionless,
    )


def _pv_kernel(version: str) -> bytes:
    """The parts of an x86 boot header rekernel reads (as tests/unit/kernelhelp.py makes them)."""
    data = bytearray(0x4000)
    data[0x1FE:0x200] = b"\x55\xaa"
    data[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", data, 0x206, 0x020F)
    struct.pack_into("<H", data, 0x20E, 0x1000)
    banner = f"{version} (builder@example) #1 SMP".encode() + b"\0"
    data[0x1200 : 0x1200 + len(banner)] = banner
    struct.pack_into("<H", data, 0x236, 1)
    return bytes(data)


def _xen_shaped(g: Any, root: str, version: str, xen_initrd: Path) -> None:
    """fstab, the extlinux APPEND, the initramfs, the getty: as a guest pygrub booted on Xen."""
    g.mount(root, "/")
    g.write(
        "/etc/fstab",
        f"# moved off a Xen host\n{root.replace('/dev/sd', '/dev/xvd')} / ext4 errors=remount-ro 0 1\n",
    )
    conf = g.read_file("/boot/extlinux/extlinux.conf").decode()
    lines = []
    for line in conf.splitlines():
        if line.strip().startswith("APPEND "):
            line = (
                f"    APPEND root={root.replace('/dev/sd', '/dev/xvd')} ro console=hvc0 net.ifnames=0 quiet"
            )
        lines.append(line)
    g.write("/boot/extlinux/extlinux.conf", "\n".join(lines) + "\n")
    text = g.read_file("/etc/initramfs-tools/initramfs.conf").decode()
    text = "\n".join("MODULES=list" if ln.startswith("MODULES=") else ln for ln in text.splitlines()) + "\n"
    g.write("/etc/initramfs-tools/initramfs.conf", text)
    g.write("/etc/initramfs-tools/modules", "# Xen PV\n" + "".join(m + "\n" for m in xenbuild.XEN_MODULES))
    g.upload(str(xen_initrd), f"/boot/initrd.img-{version}")
    g.mkdir_p("/etc/systemd/system/getty.target.wants")
    g.ln_sf(
        "/lib/systemd/system/serial-getty@.service",
        "/etc/systemd/system/getty.target.wants/serial-getty@hvc0.service",
    )
    _console_and_network(g)


def _console_and_network(g: Any) -> None:
    """As xenbuild's guests: the ttyS0 getty free to print its login prompt (xenbuild's report goes to
    ttyS1, read by kvmboot), ``enX0`` by DHCP through systemd-networkd, a stale vif rule."""
    g.rm_f("/etc/systemd/system/serial-getty@ttyS0.service")
    g.mkdir_p("/etc/network")
    nic = xenbuild.NIC
    g.write(
        "/etc/network/interfaces", f"auto lo\niface lo inet loopback\n\nauto {nic}\niface {nic} inet dhcp\n"
    )
    g.mkdir_p("/etc/systemd/network")
    g.write("/etc/systemd/network/10-xen.network", f"[Match]\nName={nic}\n\n[Network]\nDHCP=ipv4\n")
    for unit, wants in (
        ("systemd-networkd.service", "multi-user.target.wants"),
        ("systemd-networkd.socket", "sockets.target.wants"),
    ):
        g.mkdir_p(f"/etc/systemd/system/{wants}")
        g.ln_sf(f"/lib/systemd/system/{unit}", f"/etc/systemd/system/{wants}/{unit}")
    g.mkdir_p("/etc/udev/rules.d")
    g.write(
        "/etc/udev/rules.d/70-persistent-net.rules",
        f'SUBSYSTEM=="net", ACTION=="add", DRIVERS=="vif", ATTR{{address}}=="{xenbuild.VIF_MAC}", NAME="{nic}"\n',
    )
    g.write("/usr/local/sbin/vimg-report", xenbuild.XEN_REPORT_SCRIPT)
    g.chmod(0o755, "/usr/local/sbin/vimg-report")


def _add_pv(g: Any) -> None:
    g.mount("/dev/sda1", "/")
    g.write(f"/boot/vmlinuz-{PV_VERSION}", _pv_kernel(PV_VERSION))
    g.write(f"/boot/config-{PV_VERSION}", "CONFIG_X86_64=y\nCONFIG_X86_64_XEN=y\nCONFIG_XEN=y\n")
    g.write(f"/boot/initrd.img-{PV_VERSION}", b"\0" * 4096)
    conf = g.read_file("/boot/extlinux/extlinux.conf").decode()
    head, _, labels = conf.partition("\nLABEL ")
    head = "\n".join("DEFAULT xen" if ln.startswith("DEFAULT ") else ln for ln in head.splitlines())
    append = next(ln for ln in conf.splitlines() if ln.strip().startswith("APPEND "))
    entry = (
        f"LABEL xen\n    MENU LABEL Debian GNU/Linux (Xen), kernel {PV_VERSION}\n"
        f"    KERNEL /boot/vmlinuz-{PV_VERSION}\n    INITRD /boot/initrd.img-{PV_VERSION}\n{append}\n"
    )
    g.write("/boot/extlinux/extlinux.conf", f"{head}\n{entry}\nLABEL {labels}")


def _build(name: str, base: Path, edit: Any) -> Path:
    img = guestbuild.cached(f"{name}.raw", key())
    done = guestbuild.cached(f"{name}.done", key())
    with guestbuild.locked(f"image-{name}"):
        if done.exists():
            return img
        img.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "--sparse=always", str(base), str(img)], check=True)
        from vimgtools.guest.bindings import load_guestfs

        g = load_guestfs().GuestFS(python_return_dict=True)
        try:
            g.add_drive_opts(str(img), format="raw", readonly=False)
            g.launch()
            edit(g)
            g.sync()
            g.umount_all()
            g.shutdown()
        finally:
            g.close()
        done.touch()
    return img


def _xen_initrd(version: str, out: Path) -> Path:
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        xenbuild._mkinitramfs(version, xenbuild.XEN_MODULES, out.with_suffix(".tmp"))
        out.with_suffix(".tmp").rename(out)
    return out


def xen_extlinux() -> Path:
    """The Xen-shaped extlinux guest (raw, cached); copy it before changing it."""
    version = guestbuild.guest_kernel_version(guestbuild.debootstrap_tree())
    with tempfile.TemporaryDirectory(dir=guestbuild.CACHE) as tmp:

        def edit(g: Any) -> None:
            initrd = _xen_initrd(version, Path(tmp) / "xen-initrd")
            _xen_shaped(g, "/dev/sda1", version, initrd)
            g.umount_all()
            g.pwrite_device("/dev/sda", bytes(440), 0)  # pygrub needed no boot code

        return _build("xen-extlinux", guestbuild.guest_image("extlinux"), edit)


def xen_extlinux_pv() -> Path:
    """The Xen-shaped extlinux guest booting a Xen PV-only kernel by default (raw, cached)."""
    return _build("xen-extlinux-pv", xen_extlinux(), _add_pv)


def xen_partitionless() -> Path:
    """NORD's partitionless disk as a Xen guest, without boot code in sector 0 (raw, cached)."""
    version = guestbuild.guest_kernel_version(guestbuild.debootstrap_tree())
    with tempfile.TemporaryDirectory(dir=guestbuild.CACHE) as tmp:

        def edit(g: Any) -> None:
            initrd = _xen_initrd(version, Path(tmp) / "xen-initrd")
            _xen_shaped(g, "/dev/sda", version, initrd)
            g.umount_all()
            g.pwrite_device("/dev/sda", bytes(440), 0)  # the filesystem's boot sector: ext4 starts at 1024

        return _build("xen-partitionless", guestbuild.guest_image("nord"), edit)


if __name__ == "__main__":
    print(xen_extlinux())
    print(xen_extlinux_pv())
    print(xen_partitionless())
