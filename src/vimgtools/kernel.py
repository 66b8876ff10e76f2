"""Kernel(version, image, modules_dir, arch, ...): find, validate and read a kernel in a --from BOOTDIR.

``find_kernel`` reads everything the planner needs from BOOTDIR (sizes, module names, the config)
once, so that planning is a pure function; ``list_initramfs`` lists an initramfs on the host.

The version and the architecture come from the kernel image itself, not from file names, which
can lie. References: the Linux x86 boot protocol (Documentation/arch/x86/boot.rst): the setup
header's "HdrS" magic at 0x202, the protocol version at 0x206, ``kernel_version`` at 0x20E (a
pointer to a NUL-terminated string, 0x200 bytes further on) and ``xloadflags`` at 0x236
(bit 0: XLF_KERNEL_64, a 64-bit kernel, protocol 2.12+).
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from vimgtools.errors import KernelError

HDRS_OFFSET = 0x202
HDRS_MAGIC = b"HdrS"
XLF_KERNEL_64 = 1 << 0

IMAGE_NAMES = ("vmlinuz-*", "vmlinuz", "bzImage", "bzImage-*", "kernel-*", "linux-*", "Image-*", "Image")
INITRAMFS_NAMES = (
    "initrd.img-{v}",
    "initramfs-{v}.img",
    "initrd-{v}",
    "initrd-{v}.img",
    "initrd.img",
    "initrd",
)
MODULES_DIRS = ("modules", "lib/modules", "usr/lib/modules")


@dataclass(frozen=True)
class ImageHeader:
    """What the kernel image says about itself."""

    version: str  # first word of the kernel_version string, as `uname -r` prints it
    banner: str  # the whole kernel_version string
    arch: str  # "x86_64" or "i386"
    protocol: tuple[int, int]


def read_bzimage_header(data: bytes, *, name: str = "kernel image") -> ImageHeader:
    """Parse the x86 boot protocol header of a bzImage.

    Args:
        data: at least the first 64 KiB of the image (the version string sits in the setup code).
        name: what to call the image in error messages.

    Raises:
        KernelError: not an x86 bzImage, or no version string in it.
    """
    if len(data) < 0x240 or data[HDRS_OFFSET : HDRS_OFFSET + 4] != HDRS_MAGIC:
        raise KernelError(f"{name}: not an x86 bzImage (no 'HdrS' boot header at 0x202)")
    (proto,) = struct.unpack_from("<H", data, 0x206)
    protocol = (proto >> 8, proto & 0xFF)
    (ptr,) = struct.unpack_from("<H", data, 0x20E)
    start = ptr + 0x200
    if ptr == 0 or start >= len(data):
        raise KernelError(f"{name}: the boot header has no kernel version string")
    end = data.find(b"\0", start, start + 512)
    banner = data[start : end if end >= 0 else start + 512].decode("ascii", "replace").strip()
    if not banner:
        raise KernelError(f"{name}: empty kernel version string")
    arch = "i386"
    if protocol >= (2, 12):
        (xloadflags,) = struct.unpack_from("<H", data, 0x236)
        if xloadflags & XLF_KERNEL_64:
            arch = "x86_64"
    return ImageHeader(version=banner.split()[0], banner=banner, arch=arch, protocol=protocol)


def parse_config(text: str) -> dict[str, str]:
    """``CONFIG_X=y|m|"..."`` lines of a kernel .config -> {"CONFIG_X": "y"}; unset options are absent."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        m = re.match(r"(CONFIG_[A-Za-z0-9_]+)=(.*)$", line.strip())
        if m:
            out[m.group(1)] = m.group(2)
    return out


@dataclass(frozen=True)
class Kernel:
    """A kernel found in a BOOTDIR, checked against its own modules."""

    version: str
    arch: str
    image: Path
    modules_dir: Path  # BOOTDIR/.../VER
    banner: str = ""
    initramfs: Path | None = None
    config: Path | None = None
    system_map: Path | None = None
    options: dict[str, str] = field(default_factory=dict, compare=False, hash=False)
    # Read from the host once, by find_kernel, so that the planner decides without I/O:
    files_bytes: int = 0  # the image, config, System.map and initramfs together
    modules_bytes: int = 0  # regular files of the module tree (symlinks not followed)
    module_names: frozenset[str] = frozenset()  # the tree's modules, "-" as "_"
    builtin_names: frozenset[str] = frozenset()  # what modules.builtin lists, "-" as "_"

    def files(self) -> list[tuple[Path, str]]:
        """(host file, name in the guest's /boot) for the image, config, System.map, initramfs."""
        v = self.version
        out = [(self.image, f"vmlinuz-{v}")]
        if self.config:
            out.append((self.config, f"config-{v}"))
        if self.system_map:
            out.append((self.system_map, f"System.map-{v}"))
        if self.initramfs:
            out.append((self.initramfs, f"initrd.img-{v}"))
        return out

    def driver_state(self, symbol: str, module: str) -> str:
        """``"builtin"``, ``"module"`` or ``"missing"`` for a driver, by .config and then by the tree."""
        value = self.options.get(symbol)
        name = module.replace("-", "_")
        if value == "y" or (value is None and name in self.builtin_names):
            return "builtin"
        if name in self.module_names:
            return "module"
        return "missing"


def list_initramfs(path: Path) -> list[str]:
    """Files in an initramfs, listed on the host with ``lsinitramfs`` (libguestfs 1.48 cannot read zstd)."""
    exe = shutil.which("lsinitramfs")
    if exe is None:
        raise KernelError("lsinitramfs is missing on this host (Debian/Ubuntu: initramfs-tools-core)")
    try:
        out = subprocess.run([exe, str(path)], check=True, capture_output=True, text=True, timeout=300)
    except subprocess.CalledProcessError as e:
        raise KernelError(f"{path}: cannot list the initramfs: {e.stderr.strip()[-500:]}") from e
    return out.stdout.splitlines()


# Files of an initramfs that hold configuration baked in when it was made (initramfs-tools, dracut).
BAKED_CONFIG = ("conf/", "etc/fstab", "etc/crypttab", "cryptroot/", "etc/cmdline", "etc/conf.d/")


def initramfs_texts(path: Path) -> dict[str, str]:
    """The baked-in configuration files of an initramfs (``BAKED_CONFIG``), unpacked on the host.

    Raises:
        KernelError: ``unmkinitramfs`` is missing or cannot unpack it.
    """
    exe = shutil.which("unmkinitramfs")
    if exe is None:
        raise KernelError("unmkinitramfs is missing on this host (Debian/Ubuntu: initramfs-tools-core)")
    with tempfile.TemporaryDirectory(prefix="vimg-initrd-") as tmp:
        try:
            subprocess.run([exe, str(path), tmp], check=True, capture_output=True, text=True, timeout=300)
        except subprocess.CalledProcessError as e:
            raise KernelError(f"{path}: cannot unpack the initramfs: {e.stderr.strip()[-500:]}") from e
        out: dict[str, str] = {}
        top = Path(tmp)
        for f in sorted(top.rglob("*")):
            if not f.is_file() or f.is_symlink():
                continue
            rel = f.relative_to(top).as_posix()
            rel = rel.split("/", 1)[1] if rel.split("/", 1)[0] in ("main", "early", "early2") else rel
            if rel.startswith(BAKED_CONFIG) and f.stat().st_size < 1 << 20:
                out[rel] = f.read_text("utf-8", "replace")
        return out


def initramfs_has(files: list[str], module: str) -> bool:
    """Whether an initramfs's file list (``list_initramfs``) carries ``module``'s ``.ko``."""
    names = {module.replace("-", "_"), module.replace("_", "-")}
    for f in files:
        base = f.rsplit("/", 1)[-1]
        if ".ko" in base and base.split(".ko")[0] in names:
            return True
    return False


def _module_tree(mods: Path) -> tuple[int, frozenset[str], frozenset[str]]:
    """(bytes of regular files, module names, names in modules.builtin) of a module tree; ``-`` as ``_``."""
    size = sum(p.lstat().st_size for p in mods.rglob("*") if p.is_file() and not p.is_symlink())
    names = frozenset(p.name.split(".ko")[0].replace("-", "_") for p in mods.rglob("*.ko*"))
    builtin_file = mods / "modules.builtin"
    builtin = frozenset(
        Path(line.strip()).name.split(".ko")[0].replace("-", "_")
        for line in (builtin_file.read_text().splitlines() if builtin_file.is_file() else [])
    )
    return size, names, builtin


def _first(d: Path, patterns: tuple[str, ...], version: str) -> Path | None:
    for pat in patterns:
        p = d / pat.format(v=version)
        if p.is_file():
            return p
    return None


def find_kernel(bootdir: Path, *, version: str | None = None) -> Kernel:
    """Find the kernel, its modules and companions in ``bootdir``.

    Args:
        bootdir: the --from directory.
        version: pick this version when ``bootdir`` holds several kernels.

    Raises:
        KernelError: no kernel, several without ``version``, modules missing or for another version.
    """
    if not bootdir.is_dir():
        raise KernelError(f"{bootdir}: not a directory")
    headers: dict[str, tuple[Path, ImageHeader]] = {}
    problems: list[str] = []
    for pat in IMAGE_NAMES:
        for p in sorted(bootdir.glob(pat)):
            if not p.is_file() or p.name.endswith((".sig", ".sha256", ".hmac")):
                continue
            try:
                with open(p, "rb") as f:
                    hdr = read_bzimage_header(f.read(1 << 16), name=str(p))
            except KernelError as e:
                problems.append(str(e))
                continue
            headers.setdefault(hdr.version, (p, hdr))
    if not headers:
        detail = f" ({'; '.join(problems)})" if problems else ""
        raise KernelError(f"{bootdir}: no x86 kernel image (vmlinuz-VER, vmlinuz, bzImage){detail}")
    if version is not None:
        if version not in headers:
            raise KernelError(f"{bootdir}: no kernel {version}; the images say {', '.join(sorted(headers))}")
        image, hdr = headers[version]
    elif len(headers) > 1:
        raise KernelError(
            f"{bootdir}: several kernels ({', '.join(sorted(headers))}); choose one with --version"
        )
    else:
        ((image, hdr),) = headers.values()
    v = hdr.version
    if image.name.startswith("vmlinuz-") and image.name != f"vmlinuz-{v}":
        raise KernelError(f"{image}: the file name says {image.name[8:]} but the image says {v}")
    mods: Path | None = None
    found: list[str] = []
    for sub in MODULES_DIRS:
        base = bootdir / sub
        if (base / v).is_dir():
            mods = base / v
            break
        if base.is_dir():
            found += [p.name for p in base.iterdir() if p.is_dir()]
    if mods is None:
        if found:
            raise KernelError(
                f"{bootdir}: the kernel image is {v} but the modules are for {', '.join(sorted(found))}"
            )
        raise KernelError(f"{bootdir}: no modules for {v} (expected modules/{v}/ or lib/modules/{v}/)")
    if not (mods / "kernel").is_dir() and not any(mods.rglob("*.ko*")):
        raise KernelError(f"{mods}: holds no kernel modules")
    config = _first(bootdir, ("config-{v}", "config"), v)
    modules_bytes, module_names, builtin_names = _module_tree(mods)
    kernel = Kernel(
        version=v,
        arch=hdr.arch,
        image=image,
        modules_dir=mods,
        banner=hdr.banner,
        initramfs=_first(bootdir, INITRAMFS_NAMES, v),
        config=config,
        system_map=_first(bootdir, ("System.map-{v}", "System.map"), v),
        options=parse_config(config.read_text(errors="replace")) if config else {},
        modules_bytes=modules_bytes,
        module_names=module_names,
        builtin_names=builtin_names,
    )
    return replace(kernel, files_bytes=sum(p.stat().st_size for p, _ in kernel.files()))
