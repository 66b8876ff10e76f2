"""Build the small bootable Debian 12 guests and the "other kernel" BOOTDIRs the rekernel tests use.

Everything here is made from real Debian packages and cached outside the repository in
``$VIMG_TEST_CACHE`` (default ``/var/cache/vimgtools-tests``), keyed by a hash of this file, so a
second run only copies images. Run it by hand to warm the cache::

    python tests/rekernel/guestbuild.py all

Pieces:
- ``debootstrap_tree()``: ``debootstrap --variant=minbase bookworm`` plus ``linux-image-amd64``,
  ``grub-pc``, ``extlinux``, systemd, udev and a one-shot unit that reports on the serial console
  (kernel version, the modules link, a test module loaded or not, udev drivers left unloaded) and
  powers off.
- ``cloud_bootdir()``: Debian's ``linux-image-cloud-amd64`` fetched with ``apt-get download`` and
  unpacked with ``dpkg-deb -x`` into a BOOTDIR (``vmlinuz-VER``, ``config-VER``, ``System.map-VER``,
  ``modules/VER``), with or without an initramfs made by the guest's own ``mkinitramfs`` (run in a
  chroot of the tree on the host, where it takes seconds instead of minutes in the TCG appliance).
- ``guest_image(layout)``: a raw disk image built through libguestfs: ``grub2`` (one ext4 root,
  usrmerged), ``grub2-sepboot`` (separate ``/boot``), ``extlinux``, ``nord`` (no partition table:
  ext4 from sector 0, extlinux in its boot sector, as NORD installs), ``grub2-lvm`` (root on LVM).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import inspect
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
CACHE = Path(os.environ.get("VIMG_TEST_CACHE", "/var/cache/vimgtools-tests"))
MIRROR = os.environ.get("VIMG_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SUITE = "bookworm"
# A module the cloud kernel builds as =m, that nothing loads by itself: the test loads it by hand.
TEST_MODULE = "dummy"
SERIAL_TAG = "VIMG-"
IMAGE_SIZE = 3 << 30
BOOT_SIZE = 1 << 30

REPORT_SCRIPT = r"""#!/bin/sh
# vimgtools test guest: report on the serial console, then power off.
exec >/dev/ttyS0 2>&1
udevadm settle -t 30 || true
echo "VIMG-KERNEL=$(uname -r)"
echo "VIMG-MODULES-LINK=$(readlink -f /lib/modules)"
echo "VIMG-BOOT-MOUNT=$(findmnt -n -o SOURCE /boot || echo none)"
MOD=$(cat /etc/vimg-test-module 2>/dev/null || echo dummy)
if modprobe "$MOD"; then
    F=$(readlink -f "$(modinfo -n "$MOD")")
    echo "VIMG-MODULE=$MOD loaded=$(test -d /sys/module/$MOD && echo yes || echo no) file=$F"
else
    echo "VIMG-MODULE=$MOD loaded=no file=none"
fi
# Drivers udev would load for the devices present, neither loaded nor built in. Those that load
# now were missed at boot (UNLOADED); those that refuse (no such device: acpi_cpufreq in a VM) are
# not for this machine (UNAVAILABLE).
BUILTIN=/lib/modules/$(uname -r)/modules.builtin
CANDIDATES=$(cat /sys/bus/*/devices/*/modalias 2>/dev/null | sort -u | while read -r a; do
    modprobe -R "$a" 2>/dev/null; done | tr - _ | sort -u | while read -r m; do
    [ -d "/sys/module/$m" ] && continue
    grep -q "/$m.ko" "$BUILTIN" 2>/dev/null && continue
    grep -q "/$(echo "$m" | tr _ -).ko" "$BUILTIN" 2>/dev/null && continue
    echo "$m"; done)
MISSED=""
NA=""
for m in $CANDIDATES; do
    if modprobe -q "$m" 2>/dev/null && [ -d "/sys/module/$m" ]; then MISSED="$MISSED $m"; else NA="$NA $m"; fi
done
echo "VIMG-UNLOADED=$(echo $MISSED | wc -w) $MISSED"
echo "VIMG-UNAVAILABLE=$NA"
echo "VIMG-CMDLINE=$(cat /proc/cmdline)"
echo "VIMG-DONE"
sync
systemctl poweroff --no-block
"""

REPORT_UNIT = """[Unit]
Description=vimgtools test report on the serial console
After=multi-user.target
[Service]
Type=oneshot
ExecStart=/usr/local/sbin/vimg-report
[Install]
WantedBy=multi-user.target
"""

GRUB_DEFAULTS = """GRUB_DEFAULT=0
GRUB_TIMEOUT=0
GRUB_DISTRIBUTOR=Debian
GRUB_CMDLINE_LINUX_DEFAULT="quiet"
GRUB_CMDLINE_LINUX="console=ttyS0,115200n8 net.ifnames=0"
GRUB_TERMINAL=serial
GRUB_SERIAL_COMMAND="serial --unit=0 --speed=115200"
GRUB_DISABLE_OS_PROBER=true
"""


def log(msg: str) -> None:
    print(f"guestbuild: {msg}", file=sys.stderr, flush=True)


def run(*argv: str | os.PathLike[str], **kw: object) -> subprocess.CompletedProcess[str]:
    log("$ " + " ".join(map(str, argv)))
    return subprocess.run([str(a) for a in argv], check=True, text=True, **kw)  # type: ignore[call-overload,no-any-return]


@contextlib.contextmanager
def locked(name: str) -> Iterator[None]:
    """Serialise builders (two pytest runs, or a test and a hand run)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f".{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _key(*parts: object) -> str:
    """Cache key: a hash of the builder code and data a product depends on."""
    h = hashlib.sha256()
    for p in parts:
        h.update((inspect.getsource(p) if callable(p) else str(p)).encode())  # type: ignore[arg-type]
    return h.hexdigest()[:12]


def cached(name: str, key: str) -> Path:
    return CACHE / key / name


def tree_key() -> str:
    return _key(debootstrap_tree, chroot_mounts, GRUB_DEFAULTS, SUITE)


def cloud_key() -> str:
    return _key(tree_key(), cloud_bootdir, _mkinitramfs)


def image_key() -> str:
    return _key(
        tree_key(),
        guest_image,
        _install_loader,
        _tarball,
        _install_report,
        REPORT_SCRIPT,
        REPORT_UNIT,
        TEST_MODULE,
    )


@contextlib.contextmanager
def chroot_mounts(tree: Path) -> Iterator[None]:
    mounted: list[Path] = []
    try:
        for src, dst, fstype in (("proc", "proc", "proc"), ("sysfs", "sys", "sysfs"), ("/dev", "dev", None)):
            target = tree / dst
            if fstype:
                run("mount", "-t", fstype, src, target)
            else:
                run("mount", "--bind", src, target)
            mounted.append(target)
    finally:
        pass
    try:
        yield
    finally:
        for target in reversed(mounted):
            subprocess.run(["umount", "-l", str(target)], check=False)


def debootstrap_tree() -> Path:
    """A Debian 12 root tree with a kernel, GRUB 2, extlinux and the report unit (cached)."""
    done = cached("tree.done", tree_key())
    tree = cached("tree", tree_key())
    with locked("tree"):
        if done.exists():
            return tree
        if tree.exists():
            shutil.rmtree(tree)
        tree.parent.mkdir(parents=True, exist_ok=True)
        base = "systemd-sysv,udev,kmod,initramfs-tools,zstd,e2fsprogs,util-linux,ca-certificates"
        run("debootstrap", "--variant=minbase", f"--include={base}", SUITE, tree, MIRROR)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C")
        with chroot_mounts(tree):
            selections = (
                "grub-pc grub-pc/install_devices multiselect \n"
                "grub-pc grub-pc/install_devices_empty boolean true\n"
            )
            run("chroot", tree, "debconf-set-selections", input=selections, env=env)
            (tree / "etc/default").mkdir(exist_ok=True)
            (tree / "etc/default/grub").write_text(GRUB_DEFAULTS)
            run(
                "chroot",
                tree,
                "apt-get",
                "install",
                "-y",
                "-q",
                "--no-install-recommends",
                "-o",
                "Dpkg::Options::=--force-confold",
                "grub-pc",
                "extlinux",
                "syslinux-common",
                "linux-image-amd64",
                "lvm2",
                env=env,
            )
            run("chroot", tree, "apt-get", "clean", env=env)
        (tree / "etc/hostname").write_text("vimgtest\n")
        # Root without password on the console, for a human debugging a test guest.
        run("chroot", tree, "passwd", "-d", "root")
        for junk in ("var/lib/apt/lists", "usr/share/doc", "usr/share/man", "usr/share/locale"):
            shutil.rmtree(tree / junk, ignore_errors=True)
        (tree / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)
        done.touch()
    return tree


def guest_kernel_version(tree: Path) -> str:
    (ver,) = [p.name for p in (tree / "usr/lib/modules").iterdir()]
    return ver


def cloud_bootdir(*, initramfs: bool) -> Path:
    """BOOTDIR with Debian's cloud kernel, optionally with an initramfs built by the guest's tool."""
    name = "cloud-bootdir-initrd" if initramfs else "cloud-bootdir"
    out = cached(name, cloud_key())
    done = cached(name + ".done", cloud_key())
    with locked("cloud"):
        if done.exists():
            return out
        if out.exists():
            shutil.rmtree(out)
        debs = CACHE / "debs"
        debs.mkdir(parents=True, exist_ok=True)
        if not list(debs.glob("linux-image-*-cloud-amd64_*.deb")):
            dep = run(
                "apt-cache", "depends", "--no-recommends", "linux-image-cloud-amd64", capture_output=True
            ).stdout
            pkgs = [
                line.split(":", 1)[1].strip()
                for line in dep.splitlines()
                if line.strip().startswith("Depends:") and "cloud-amd64" in line and "linux-image-" in line
            ]
            pkg = next(p for p in pkgs if not p.endswith("-unsigned") and "-dbg" not in p)
            run("apt-get", "download", pkg, cwd=debs)
        (deb,) = debs.glob("linux-image-*-cloud-amd64_*.deb")
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            x = Path(tmp) / "x"
            run("dpkg-deb", "-x", deb, x)
            mods = x / "lib/modules" if (x / "lib/modules").is_dir() else x / "usr/lib/modules"
            (ver,) = [p.name for p in mods.iterdir()]
            out.mkdir(parents=True)
            for f in ("vmlinuz", "config", "System.map"):
                shutil.copy2(x / "boot" / f"{f}-{ver}", out / f"{f}-{ver}")
            (out / "modules").mkdir()
            shutil.move(mods / ver, out / "modules" / ver)
            if initramfs:
                _mkinitramfs(out, ver)
        done.touch()
    return out


def _mkinitramfs(bootdir: Path, ver: str) -> None:
    """Run the guest's own mkinitramfs (in a chroot of the tree) against the new kernel's modules."""
    tree = debootstrap_tree()
    target = tree / "usr/lib/modules" / ver
    shutil.copytree(bootdir / "modules" / ver, target, symlinks=True)
    shutil.copy2(bootdir / f"config-{ver}", tree / "boot" / f"config-{ver}")
    try:
        run("depmod", "-b", tree, ver)
        with chroot_mounts(tree):
            run("chroot", tree, "mkinitramfs", "-o", f"/tmp/initrd.img-{ver}", ver)
        shutil.move(tree / "tmp" / f"initrd.img-{ver}", bootdir / f"initrd.img-{ver}")
    finally:
        shutil.rmtree(target, ignore_errors=True)
        (tree / "boot" / f"config-{ver}").unlink(missing_ok=True)


def _tarball(tree: Path, dest: Path, *, exclude_boot: bool) -> None:
    argv = ["tar", "-C", str(tree), "--numeric-owner", "--xattrs", "-cf", str(dest)]
    if exclude_boot:
        argv += ["--exclude=./boot/*"]
    run(*argv, ".")


def _install_report(g: Any) -> None:
    g.write("/usr/local/sbin/vimg-report", REPORT_SCRIPT)
    g.chmod(0o755, "/usr/local/sbin/vimg-report")
    g.write("/etc/vimg-test-module", TEST_MODULE + "\n")
    g.write("/etc/systemd/system/vimg-report.service", REPORT_UNIT)
    # A getty on ttyS0 would vhangup() the console under the report script and swallow its output.
    g.ln_sf("/dev/null", "/etc/systemd/system/serial-getty@ttyS0.service")
    g.mkdir_p("/etc/systemd/system/multi-user.target.wants")
    g.ln_s(
        "/etc/systemd/system/vimg-report.service",
        "/etc/systemd/system/multi-user.target.wants/vimg-report.service",
    )


def _install_loader(guestfs: Any, img: Path, layout: str, tree: Path) -> None:
    g = guestfs.GuestFS(python_return_dict=True)
    try:
        g.add_drive_opts(str(img), format="raw", readonly=False)
        g.launch()
        if layout == "grub2-sepboot":
            g.mount("/dev/sda2", "/")
            g.mount("/dev/sda1", "/boot")
        elif layout == "nord":
            g.mount("/dev/sda", "/")
        elif layout == "grub2-lvm":
            g.mount("/dev/vg0/root", "/")
        else:
            g.mount("/dev/sda1", "/")
        if layout.startswith("grub2"):
            g.command(["grub-install", "--target=i386-pc", "/dev/sda"])
            g.command(["update-grub"])
        elif layout in ("extlinux", "nord"):
            uuid = g.vfs_uuid("/dev/sda1" if layout == "extlinux" else "/dev/sda")
            ver = guest_kernel_version(tree)
            g.mkdir_p("/boot/extlinux")
            g.write(
                "/boot/extlinux/extlinux.conf",
                "SERIAL 0 115200\n"
                "DEFAULT debian\n"
                "TIMEOUT 1\n"
                "PROMPT 0\n\n"
                "LABEL debian\n"
                f"    MENU LABEL Debian GNU/Linux, kernel {ver}\n"
                f"    KERNEL /boot/vmlinuz-{ver}\n"
                f"    INITRD /boot/initrd.img-{ver}\n"
                f"    APPEND root=UUID={uuid} ro console=ttyS0,115200n8 net.ifnames=0 quiet\n",
            )
            g.command(["extlinux", "--install", "/boot/extlinux"])
            if layout == "extlinux":
                mbr = g.read_file("/usr/lib/syslinux/mbr/mbr.bin")
                g.pwrite_device("/dev/sda", mbr[:440], 0)
        else:
            raise ValueError(layout)
        g.sync()
        g.umount_all()
        g.shutdown()
    finally:
        g.close()


def guest_image(layout: str) -> Path:
    """A raw bootable image of ``layout`` ("grub2", "grub2-sepboot", "extlinux", "nord", "grub2-lvm"), cached."""
    img = cached(f"{layout}.raw", image_key())
    done = cached(f"{layout}.done", image_key())
    with locked(f"image-{layout}"):
        if done.exists():
            return img
        tree = debootstrap_tree()
        from vimgtools.guest.bindings import load_guestfs

        guestfs = load_guestfs()
        img.parent.mkdir(parents=True, exist_ok=True)
        img.unlink(missing_ok=True)
        with open(img, "wb") as f:
            f.truncate(IMAGE_SIZE)
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            tar = Path(tmp) / "root.tar"
            boot_tar = Path(tmp) / "boot.tar"
            sepboot = layout == "grub2-sepboot"
            _tarball(tree, tar, exclude_boot=sepboot)
            if sepboot:
                run("tar", "-C", str(tree / "boot"), "--numeric-owner", "-cf", str(boot_tar), ".")
            # Launch 1: partition, format, fill.
            g = guestfs.GuestFS(python_return_dict=True)
            g.add_drive_opts(str(img), format="raw", readonly=False)
            g.launch()
            if layout == "nord":
                # NORD's layout: no partition table, the filesystem starts at sector 0 and its boot
                # sector (written by extlinux) is what the BIOS runs.
                g.mkfs("ext4", "/dev/sda", label="root", features="^64bit,^metadata_csum")
                root_dev = "/dev/sda"
            else:
                g.part_init("/dev/sda", "mbr")
            if layout == "nord":
                pass
            elif layout == "grub2-lvm":
                g.part_add("/dev/sda", "p", 2048, -2048)
                g.pvcreate("/dev/sda1")
                g.vgcreate("vg0", ["/dev/sda1"])
                g.lvcreate_free("root", "vg0", 100)
                g.mkfs("ext4", "/dev/vg0/root", label="root")
                root_dev = "/dev/vg0/root"
            elif sepboot:
                boot_end = 2048 + BOOT_SIZE // 512 - 1
                g.part_add("/dev/sda", "p", 2048, boot_end)
                g.part_add("/dev/sda", "p", boot_end + 1, -2048)
                g.mkfs("ext4", "/dev/sda1", label="boot")
                g.mkfs("ext4", "/dev/sda2", label="root")
                root_dev = "/dev/sda2"
            else:
                g.part_add("/dev/sda", "p", 2048, -2048)
                # extlinux reads ext4 without 64bit; keep the root plain for all layouts.
                g.mkfs("ext4", "/dev/sda1", label="root", features="^64bit,^metadata_csum")
                root_dev = "/dev/sda1"
            if layout != "nord":
                g.part_set_bootable("/dev/sda", 1, True)
            g.mount(root_dev, "/")
            g.tar_in(str(tar), "/", xattrs=True)
            root_uuid = g.vfs_uuid(root_dev)
            fstab = f"UUID={root_uuid} / ext4 errors=remount-ro 0 1\n"
            if sepboot:
                g.mkdir_p("/boot")
                g.mount("/dev/sda1", "/boot")
                g.tar_in(str(boot_tar), "/boot")
                fstab += f"UUID={g.vfs_uuid('/dev/sda1')} /boot ext4 defaults 0 2\n"
            g.write("/etc/fstab", fstab)
            _install_report(g)
            g.sync()
            g.umount_all()
            g.shutdown()
            g.close()
        # Launch 2 (fresh, FIELD-NOTES: grub-install is flaky right after mkfs, and now and then in a
        # fresh appliance too): install the loader, retrying in a new appliance.
        for attempt in range(1, 4):
            try:
                _install_loader(guestfs, img, layout, tree)
                break
            except RuntimeError as e:
                log(f"installing the loader failed (attempt {attempt}): {e}")
                if attempt == 3:
                    raise
        done.touch()
    return img


def main(argv: list[str]) -> int:
    what = argv[0] if argv else "all"
    if what in ("tree", "all"):
        print(debootstrap_tree())
    if what in ("cloud", "all"):
        print(cloud_bootdir(initramfs=False))
        print(cloud_bootdir(initramfs=True))
    for layout in ("grub2", "grub2-sepboot", "extlinux", "nord", "grub2-lvm"):
        if what in (layout, "all", "images"):
            print(guest_image(layout))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
