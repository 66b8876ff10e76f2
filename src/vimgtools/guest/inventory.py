"""Inventory: what retargeting a guest from Xen to KVM must know, read once through a Guest, as plain data.

Disks and filesystems (type, UUID, label), every file where a device name, a kernel command line,
a console, an initramfs module list, a modprobe alias or a NIC name lives, the enabled getty links,
and, per kernel in ``/boot``, the config symbols and module names that say whether it can boot on
KVM. ``collect_inventory`` is the only reader; ``rekernel.xen`` decides from the result alone.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vimgtools.errors import GuestError
from vimgtools.guest.facts import boot_code_of

if TYPE_CHECKING:
    from vimgtools.guest.protocol import Guest

# Files read when present (absent ones are missing from ``files``).
FILES = (
    "/etc/fstab",
    "/etc/crypttab",
    "/etc/default/grub",
    "/etc/sysconfig/grub",
    "/boot/grub/grub.cfg",
    "/boot/grub2/grub.cfg",
    "/boot/grub/menu.lst",
    "/boot/grub/grub.conf",
    "/boot/extlinux/extlinux.conf",
    "/boot/extlinux.conf",
    "/boot/syslinux/syslinux.cfg",
    "/extlinux.conf",
    "/etc/inittab",
    "/etc/securetty",
    "/etc/initramfs-tools/initramfs.conf",
    "/etc/initramfs-tools/modules",
    "/etc/initramfs-tools/conf.d/resume",
    "/etc/dracut.conf",
    "/etc/sysconfig/kernel",
    "/etc/sysconfig/bootloader",
    "/etc/modprobe.conf",
    "/etc/network/interfaces",
    "/etc/udev/rules.d/70-persistent-net.rules",
    "/etc/os-release",
    "/usr/lib/os-release",
)
# Directories whose matching files are read too.
DIRS = (
    ("/etc/dracut.conf.d", ".conf"),
    ("/etc/modprobe.d", ".conf"),
    ("/boot/loader/entries", ".conf"),
    ("/etc/systemd/network", ""),
    ("/etc/sysconfig/network", ""),
)
# Where enabled getty units are linked.
GETTY_DIRS = (
    "/etc/systemd/system/getty.target.wants",
    "/etc/systemd/system/multi-user.target.wants",
)
# Config symbols read from /boot/config-VER.
KERNEL_SYMBOLS = (
    "CONFIG_X86_XEN",
    "CONFIG_X86_64_XEN",
    "CONFIG_XEN_PV",
    "CONFIG_VIRTIO_PCI",
    "CONFIG_VIRTIO_BLK",
    "CONFIG_SCSI_VIRTIO",
    "CONFIG_VIRTIO_NET",
    "CONFIG_EXT4_FS",
    "CONFIG_EXT2_FS",
    "CONFIG_XFS_FS",
    "CONFIG_BTRFS_FS",
)
MBR_BINS = ("/usr/lib/syslinux/mbr/mbr.bin", "/usr/share/syslinux/mbr.bin", "/usr/lib/syslinux/mbr.bin")
UDEVD = ("/lib/systemd/systemd-udevd", "/usr/lib/systemd/systemd-udevd")


@dataclass(frozen=True)
class Filesystem:
    device: str  # as the appliance names it: /dev/sda1, /dev/sdb, /dev/vg0/root
    type: str
    uuid: str = ""
    label: str = ""


@dataclass(frozen=True)
class GuestKernel:
    """One kernel in the guest's /boot, and what it can drive."""

    version: str
    config: dict[str, str] = field(default_factory=dict)  # KERNEL_SYMBOLS found in config-VER
    has_config: bool = False
    modules: frozenset[str] = frozenset()  # module names of /lib/modules/VER, "-" as "_"
    builtin: frozenset[str] = frozenset()  # modules.builtin names, "-" as "_"

    def driver_state(self, symbol: str, module: str) -> str:
        """``"builtin"``, ``"module"`` or ``"missing"`` (by config-VER, then the module tree)."""
        name = module.replace("-", "_")
        value = self.config.get(symbol)
        if value == "y" or (value is None and name in self.builtin):
            return "builtin"
        if name in self.modules:
            return "module"
        return "missing"

    @property
    def pv_only(self) -> bool:
        """An old xenified kernel (CONFIG_X86_XEN / CONFIG_X86_64_XEN), or a SUSE ``-xen`` flavour."""
        if self.config.get("CONFIG_X86_XEN") == "y" or self.config.get("CONFIG_X86_64_XEN") == "y":
            return True
        return not self.has_config and self.version.endswith("-xen")


@dataclass
class Inventory:
    """Plain data about a guest's disks and configuration, for the Xen -> KVM planner."""

    disks: list[str]
    partitions: list[str]
    filesystems: dict[str, Filesystem]
    files: dict[str, str]
    getty_links: dict[str, str]  # link -> target, for getty units in GETTY_DIRS
    kernels: dict[str, GuestKernel]
    boot_sectors: dict[str, bytes]  # disk -> its first 512 bytes
    systemd_udev: bool = True
    mbr_bin: str | None = None  # syslinux's mbr.bin in the guest

    def text(self, path: str) -> str | None:
        return self.files.get(path)

    def by_uuid(self, uuid: str) -> list[Filesystem]:
        return [f for f in self.filesystems.values() if f.uuid and f.uuid.lower() == uuid.lower()]

    def by_label(self, label: str) -> list[Filesystem]:
        return [f for f in self.filesystems.values() if f.label and f.label == label]

    def partitioned(self, disk: str) -> bool:
        return any(re.fullmatch(re.escape(disk) + r"p?\d+", p) for p in self.partitions)

    def summary(self) -> dict[str, Any]:
        return {
            "disks": [
                {
                    "device": d,
                    "partitioned": self.partitioned(d),
                    "boot_code": boot_code_of(self.boot_sectors.get(d, b"")),
                }
                for d in self.disks
            ],
            "filesystems": [
                {"device": f.device, "type": f.type, "uuid": f.uuid, "label": f.label}
                for f in self.filesystems.values()
            ],
            "files": sorted(self.files),
            "getty_links": sorted(self.getty_links),
            "kernels": {
                v: {
                    "pv_only": k.pv_only,
                    "config": k.has_config,
                    "virtio_blk": k.driver_state("CONFIG_VIRTIO_BLK", "virtio_blk"),
                }
                for v, k in self.kernels.items()
            },
        }


def _names(paths: list[str], suffix: str) -> frozenset[str]:
    return frozenset(
        posixpath.basename(p).split(".ko")[0].replace("-", "_")
        for p in paths
        if suffix in posixpath.basename(p)
    )


def collect_kernel(gi: Guest, version: str) -> GuestKernel:
    """What ``/boot/config-VER`` and ``/lib/modules/VER`` say about one of the guest's kernels."""
    config: dict[str, str] = {}
    text = gi.text(f"/boot/config-{version}")
    if text is not None:
        for line in text.splitlines():
            k, _, v = line.partition("=")
            if k in KERNEL_SYMBOLS:
                config[k] = v.strip()
    modules: frozenset[str] = frozenset()
    builtin: frozenset[str] = frozenset()
    tree = f"/lib/modules/{version}"
    if gi.is_dir(tree) or gi.exists(tree):
        try:
            modules = _names(gi.find(tree), ".ko")
        except GuestError:
            modules = frozenset()
        b = gi.text(f"{tree}/modules.builtin")
        if b:
            builtin = _names(b.split(), ".ko")
    return GuestKernel(version, config, text is not None, modules, builtin)


def read_filesystems(gi: Guest) -> dict[str, Filesystem]:
    """Every filesystem the appliance sees, with its UUID and label."""
    filesystems: dict[str, Filesystem] = {}
    for dev, fstype in gi.list_filesystems().items():
        if fstype in ("unknown", ""):
            continue
        uuid = label = ""
        try:
            uuid = gi.vfs_uuid(dev)
            label = gi.vfs_label(dev)
        except GuestError:
            pass
        filesystems[dev] = Filesystem(dev, fstype, uuid, label)
    return filesystems


def collect_inventory(gi: Guest, boot_kernels: list[str]) -> Inventory:
    """Read everything the Xen -> KVM planner needs; the guest's root must be mounted.

    Args:
        boot_kernels: versions of the guest's ``/boot/vmlinuz-*`` (``GuestFacts.boot_kernels``).
    """
    filesystems = read_filesystems(gi)
    files: dict[str, str] = {}
    for f in FILES:
        t = gi.text(f)
        if t is not None:
            files[f] = t
    for d, suffix in DIRS:
        if not gi.is_dir(d):
            continue
        for name in gi.ls(d):
            p = f"{d}/{name}"
            if name.endswith(suffix) and gi.is_file(p) and (t := gi.text(p)) is not None:
                files[p] = t
    getty: dict[str, str] = {}
    for d in GETTY_DIRS:
        if gi.is_dir(d):
            for name in gi.ls(d):
                if "getty@" in name:
                    getty[f"{d}/{name}"] = gi.readlink(f"{d}/{name}") or ""
    disks = gi.list_devices()
    sectors = {d: gi.pread_device(d, 512, 0) for d in disks}
    return Inventory(
        disks=disks,
        partitions=gi.list_partitions(),
        filesystems=filesystems,
        files=files,
        getty_links=getty,
        kernels={v: collect_kernel(gi, v) for v in boot_kernels},
        boot_sectors=sectors,
        systemd_udev=any(gi.exists(p) for p in UDEVD),
        mbr_bin=next((p for p in MBR_BINS if gi.is_file(p)), None),
    )
