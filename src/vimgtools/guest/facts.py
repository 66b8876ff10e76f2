"""GuestFacts: what rekernel needs to know about a guest, read once through a Guest, as plain data.

``collect_facts`` is the only reader; the planner and the loaders' ``steps`` decide from the facts alone.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vimgtools.errors import GuestError, InvalidInput

if TYPE_CHECKING:
    from vimgtools.guest.protocol import Guest

log = logging.getLogger("vimgtools.guest")

# Configuration files the planner and the loaders read; absent ones are simply missing from `files`.
CONFIG_FILES = (
    "/etc/fstab",
    "/etc/default/grub",
    "/boot/grub/grub.cfg",
    "/boot/grub2/grub.cfg",
    "/boot/grub/grubenv",
    "/boot/grub2/grubenv",
    "/boot/grub/menu.lst",
    "/boot/grub/grub.conf",
    "/boot/extlinux/extlinux.conf",
    "/boot/extlinux.conf",
    "/boot/syslinux/syslinux.cfg",
    "/extlinux.conf",
    "/etc/lilo.conf",
    "/etc/zipl.conf",
    "/etc/selinux/config",
    "/etc/initramfs-tools/initramfs.conf",
)
TOOLS = (
    "/usr/sbin/update-initramfs",
    "/usr/sbin/mkinitramfs",
    "/usr/bin/dracut",
    "/usr/sbin/dracut",
    "/sbin/mkinitrd",
    "/usr/sbin/mkinitrd",
    "/usr/sbin/update-grub",
    "/usr/sbin/grub-mkconfig",
    "/usr/sbin/grub2-mkconfig",
    "/usr/bin/grub-editenv",
    "/usr/bin/grub2-editenv",
    "/usr/sbin/grub-install",
    "/usr/bin/extlinux",
    "/usr/sbin/extlinux",
    "/sbin/lilo",
    "/usr/sbin/zipl",
    "/sbin/zipl",
    "/usr/sbin/setfiles",
    "/sbin/setfiles",
)


@dataclass
class GuestFacts:
    """Plain data about one guest root; the planner and the loaders decide from this alone."""

    root: str
    arch: str
    distro: str
    product: str
    mountpoints: dict[str, str]  # mountpoint -> device
    fs_types: dict[str, str]  # mountpoint -> vfs type
    boot_separate: bool
    lib_is_link: bool  # usrmerge: /lib -> usr/lib
    modules_path: str  # the real directory behind /lib/modules ("/usr/lib/modules")
    modules_on_boot: bool  # already follows the /boot/modules convention
    module_versions: dict[str, int]  # existing module trees: version -> bytes
    boot_kernels: list[str]  # versions of /boot/vmlinuz-*
    boot_free: int  # bytes free on the filesystem holding /boot
    boot_sector: bytes
    files: dict[str, str] = field(default_factory=dict)
    tools: set[str] = field(default_factory=set)
    selinux: str = "disabled"  # enforcing, permissive, disabled

    def text(self, path: str) -> str | None:
        return self.files.get(path)

    def has_tool(self, *names: str) -> str | None:
        """The first of ``names`` (basenames) present in the guest, as an absolute path."""
        for n in names:
            for t in sorted(self.tools):
                if t.rsplit("/", 1)[1] == n:
                    return t
        return None

    @property
    def boot_code(self) -> str | None:
        """What sector 0 holds: "grub", "syslinux", "lilo", "other" boot code, or None (no MBR code)."""
        return boot_code_of(self.boot_sector)

    def summary(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "arch": self.arch,
            "distro": self.distro,
            "product": self.product,
            "mountpoints": self.mountpoints,
            "boot_separate": self.boot_separate,
            "usrmerge": self.lib_is_link,
            "modules_path": self.modules_path,
            "modules_on_boot": self.modules_on_boot,
            "kernels": self.boot_kernels,
            "boot_free": self.boot_free,
            "boot_code": self.boot_code,
            "selinux": self.selinux,
        }


def boot_code_of(s: bytes) -> str | None:
    """What a sector 0 holds: "grub", "syslinux", "lilo", "other" boot code, or None (no MBR code)."""
    if len(s) < 512 or s[510:512] != b"\x55\xaa" or not any(s[:440]):
        return None
    if b"GRUB" in s[:440]:
        return "grub"
    if b"LILO" in s[:512]:
        return "lilo"
    # syslinux's mbr.bin has no signature string; its first instructions are well known.
    if s[:3] == b"\x33\xc0\xfa" or b"Missing OS" in s or b"SYSLINUX" in s.upper():
        return "syslinux"
    return "other"


def choose_root(gi: Guest, wanted: str | None) -> str:
    """The root to change: ``wanted``, or the only one. Snapper snapshots are never a target."""
    roots = gi.roots()
    if not roots:
        raise InvalidInput(f"{gi.image}: no operating system found (inspect_os found no root)")
    # SUSE snapper snapshots show up as extra roots: skip read-only btrfs snapshot subvolumes.
    real = [r for r in roots if "/.snapshots/" not in r and "@/.snapshots" not in r]
    if wanted:
        if wanted not in roots:
            raise InvalidInput(f"{gi.image}: no root {wanted}; the roots are {', '.join(roots)}")
        if wanted not in real:
            raise InvalidInput(f"{wanted}: a read-only snapshot, not a target")
        return wanted
    if len(real) > 1:
        raise InvalidInput(f"{gi.image}: several systems ({', '.join(real)}); choose one with --root")
    return real[0]


def collect_facts(
    gi: Guest, root: str, *, extra_files: Iterable[str] = (), mountpoints: dict[str, str] | None = None
) -> GuestFacts:
    """Read everything the plan needs; ``root`` must be mounted (``Guest.mount_root``).

    Args:
        extra_files: more text files to read into ``files`` besides ``CONFIG_FILES`` (absent: left out).
        mountpoints: the guest's mountpoints as mounted (``Guest.mount_view``); default: as
            libguestfs's inspection maps the guest's fstab.
    """
    mps: dict[str, str] = dict(mountpoints) if mountpoints is not None else gi.inspect_get_mountpoints(root)
    fs_types: dict[str, str] = {}
    for mp, dev in mps.items():
        try:
            fs_types[mp] = gi.vfs_type(dev)
        except GuestError:
            fs_types[mp] = "unknown"
    lib_is_link = bool(gi.is_symlink("/lib"))
    modules_path = gi.realpath("/lib/modules") if gi.exists("/lib/modules") else "/usr/lib/modules"
    boot_real = gi.realpath("/boot/modules") if gi.exists("/boot/modules") else "/boot/modules"
    modules_on_boot = modules_path == boot_real and gi.exists("/boot/modules")
    module_versions: dict[str, int] = {}
    if gi.is_dir(modules_path):
        for v in gi.ls(modules_path):
            p = f"{modules_path}/{v}"
            if gi.is_dir(p):
                module_versions[v] = int(gi.du(p)) * 1024
    boot_kernels = sorted(
        n[len("vmlinuz-") :] for n in gi.ls("/boot") if n.startswith("vmlinuz-") and gi.is_file(f"/boot/{n}")
    )
    st: dict[str, int] = gi.statvfs("/boot")
    files: dict[str, str] = {}
    for f in (*CONFIG_FILES, *extra_files):
        t = gi.text(f)
        if t is not None:
            files[f] = t
    tools = {t for t in TOOLS if gi.exists(t)}
    selinux = "disabled"
    conf = files.get("/etc/selinux/config")
    if conf:
        m = re.search(r"^\s*SELINUX\s*=\s*(\w+)", conf, re.M)
        if m:
            selinux = m.group(1).lower()
    device = _whole_device(mps.get("/boot") or mps["/"])
    sector: bytes = gi.pread_device(device, 512, 0)
    arch = gi.inspect_get_arch(root)
    if arch == "unknown":
        # /usr on another disk (a shared system disk): inspection of the root alone finds no binary.
        for exe in ("/bin/sh", "/usr/bin/ls", "/bin/ls"):
            try:
                arch = gi.file_architecture(gi.realpath(exe))
                break
            except GuestError:
                continue
    return GuestFacts(
        root=root,
        arch=arch,
        distro=gi.inspect_get_distro(root),
        product=gi.inspect_get_product_name(root),
        mountpoints=dict(mps),
        fs_types=fs_types,
        boot_separate="/boot" in mps,
        lib_is_link=lib_is_link,
        modules_path=modules_path,
        modules_on_boot=modules_on_boot,
        module_versions=module_versions,
        boot_kernels=boot_kernels,
        boot_free=st["bavail"] * st["bsize"],
        boot_sector=sector,
        files=files,
        tools=tools,
        selinux=selinux,
    )


def _whole_device(dev: str) -> str:
    """/dev/sda1 -> /dev/sda; /dev/sda (partitionless, NORD) stays; LVM -> /dev/sda (first disk)."""
    m = re.match(r"(/dev/[shv]d[a-z]+)\d*$", dev)
    if m:
        return m.group(1)
    m = re.match(r"(/dev/nvme\d+n\d+)(p\d+)?$", dev)
    if m:
        return m.group(1)
    return "/dev/sda"
