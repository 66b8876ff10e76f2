"""Image formats: which format an image is read as, its virtual size and backing chain (``qemu-img``).

The rule (CVE-2010-3851: a guest can write any format's header into its raw disk):

- a format given (``--src-format``/``--dst-format``) is never probed;
- a block device is raw;
- a file with none of QEMU's other formats' magic numbers at its start (or end) is raw;
- any other file is probed with ``qemu-img info``; a non-raw answer is believed only when the
  file's name carries that format's extension (``mail.qcow2``, ``disk.vmdk``). A file that
  looks like another format under another name (``mail.img`` with a qcow2 header) is
  refused: it may be a raw guest disk whose guest wrote that header. Naming the format
  (either one) is the way out;
- a file that does not exist yet is created in the format its extension names, else raw.

Non-raw images are opened through ``nbd`` (a private export per image); raw ones
directly (``image.Image``). ``images.open_image`` is the one place that decides.

References: qemu-img(1) ``info``, ``check``, ``create``, ``resize``; qemu-block-drivers(7).
"""

from __future__ import annotations

import functools
import os
import re
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from vimgtools.errors import ImageError, ImageRefused, InvalidInput

if TYPE_CHECKING:
    import subprocess

# The extensions that name a format (only these make a probed format believed).
EXTENSIONS = {
    "qcow2": "qcow2",
    "qcow": "qcow",
    "qed": "qed",
    "vmdk": "vmdk",
    "vdi": "vdi",
    "vhdx": "vhdx",
    "vhd": "vpc",
    "vpc": "vpc",
    "raw": "raw",
    "img": "raw",
}
QEMU_IMG_TIMEOUT = 120
# What the header (or, for vpc and dmg, the last sector) of an image in one of QEMU's other
# formats starts with (their block drivers' probes). A file with none of these is raw without
# asking qemu-img: a subprocess per image saved, and its reads kept out of the page cache.
HEAD_MAGICS = (
    b"QFI\xfb", b"QED\0", b"KDMV", b"COWD", b"# Disk DescriptorFile", b"<<< ", b"vhdxfile",
    b"conectix", b"WithoutFreeSpace", b"WithouFreSpacExt", b"LUKS\xba\xbe", b"Bochs Virtual HD Image",
    b"#!/bin/sh\n#V2.0 Format",
)  # fmt: skip
TAIL_MAGICS = (b"conectix", b"koly")
VDI_SIGNATURE = (0x40, b"\x7f\x10\xda\xbe")


class ImageInfo(NamedTuple):
    """What ``qemu-img info`` says of an image (or what we know of a raw one without asking)."""

    path: Path
    format: str
    virtual_size: int
    cluster_size: int = 0
    encrypted: bool = False
    chain: tuple[dict[str, Any], ...] = ()  # the image, then its backing files
    bitmaps: tuple[Bitmap, ...] = ()  # a qcow2's persistent dirty bitmaps

    def chain_json(self) -> list[dict[str, Any]]:
        return [dict(c) for c in self.chain]


class Bitmap(NamedTuple):
    """A persistent dirty bitmap of a qcow2 image, as ``qemu-img info`` lists it."""

    name: str
    granularity: int
    flags: tuple[str, ...]

    @property
    def consistent(self) -> bool:
        """Recording, and not left "in-use" by a QEMU that died with the image open."""
        return "in-use" not in self.flags and "auto" in self.flags


@functools.lru_cache(maxsize=1)
def known_formats() -> frozenset[str]:
    """The formats this host's qemu-img supports (``Supported formats:`` of ``qemu-img --help``)."""
    import subprocess  # here, as in _qemu_img: a run on raw images starts no process (~5 ms of imports)

    try:
        out = subprocess.run(["qemu-img", "--help"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return frozenset({"raw"})
    m = re.search(r"Supported formats:(.*)", out)
    return frozenset((m.group(1).split() if m else []) + ["raw"])


def check_format_name(fmt: str, option: str) -> None:
    if fmt != "raw" and fmt not in known_formats():
        raise InvalidInput(
            f"{fmt!r}: not a format qemu-img knows here ({', '.join(sorted(known_formats()))})", option=option
        )


def may_be_formatted(head: bytes, tail: bytes) -> bool:
    """Whether the first and last 512 bytes of a file could be a non-raw image (then qemu-img is asked)."""
    off, sig = VDI_SIGNATURE
    return head.startswith(HEAD_MAGICS) or tail.startswith(TAIL_MAGICS) or head[off : off + len(sig)] == sig


def format_by_name(path: Path) -> str | None:
    """The format a file's extension names, or None."""
    return EXTENSIONS.get(path.suffix.lower().lstrip("."))


def _qemu_img(args: list[str], path: Path) -> subprocess.CompletedProcess[str]:
    import subprocess

    try:
        return subprocess.run(
            ["qemu-img", *args], capture_output=True, text=True, timeout=QEMU_IMG_TIMEOUT, check=False
        )
    except FileNotFoundError:
        raise ImageError(f"{path}: qemu-img is not installed (Debian: apt-get install qemu-utils)") from None
    except subprocess.TimeoutExpired:
        raise ImageError(f"{path}: qemu-img {args[0]} did not answer in {QEMU_IMG_TIMEOUT} s") from None


def _qemu_said(p: subprocess.CompletedProcess[str]) -> str:
    """qemu-img's error as one line, without its "qemu-img: " prefix and the path it repeats."""
    text = " ".join(line.strip() for line in p.stderr.splitlines() if line.strip())
    return text.removeprefix("qemu-img: ") or f"qemu-img exited with {p.returncode}"


def inspect(path: Path, fmt: str | None, *, force_share: bool = False) -> ImageInfo:
    """The image at ``path`` read as ``fmt`` (None: probed by the rule above), checked for damage.

    Raises:
        ImageRefused: damaged, encrypted, its backing file missing, or a probed format under
            another format's name (exit 2; nothing was written).
    """
    st = os.stat(path)
    if fmt is None and stat.S_ISBLK(st.st_mode):
        fmt = "raw"
    if fmt == "raw":
        return ImageInfo(path, "raw", -1, chain=({"filename": str(path), "format": "raw"},))
    args = ["info", "--output=json", "--backing-chain"]
    if force_share:
        args.append("-U")
    if fmt is not None:
        args += ["-f", fmt]
    p = _qemu_img([*args, str(path)], path)
    if p.returncode != 0:
        raise ImageRefused(f"{path}: {_qemu_said(p)}")
    import json  # here, with subprocess (see _qemu_img)

    infos = json.loads(p.stdout)
    top = infos[0]
    found = str(top["format"])
    if fmt is None and found != "raw" and format_by_name(path) != found:
        raise ImageRefused(
            f"{path}: looks like a {found} image but is not named .{found}: it may be a raw guest disk "
            f"whose guest wrote a {found} header; say which it is with --src-format/--dst-format {found} or raw"
        )
    if top.get("encrypted"):
        raise ImageRefused(
            f"{path}: is an encrypted {found} image; vimgtools cannot open it without its secret"
        )
    chain = tuple(
        {"filename": str(i.get("filename")), "format": str(i.get("format"))}
        | ({"backing_filename": str(i["backing-filename"])} if "backing-filename" in i else {})
        for i in infos
    )
    listed = top.get("format-specific", {}).get("data", {}).get("bitmaps", [])
    bitmaps = tuple(Bitmap(str(b["name"]), int(b["granularity"]), tuple(b.get("flags", []))) for b in listed)
    cluster = int(top.get("cluster-size") or 0)
    info = ImageInfo(path, found, int(top["virtual-size"]), cluster, False, chain, bitmaps)
    if found in ("qcow2", "qed", "vdi", "vhdx", "parallels"):  # formats with metadata qemu-img can check
        _check(path, found, force_share)
    return info


def _check(path: Path, fmt: str, force_share: bool) -> None:
    args = ["check", "-f", fmt, "--output=json"] + (["-U"] if force_share else [])
    p = _qemu_img([*args, str(path)], path)
    # 0: clean; 3: leaked clusters only (harmless); 2: corruptions; 1: could not check
    if p.returncode in (0, 3):
        return
    import json

    try:
        report = json.loads(p.stdout)
        detail = f"{report.get('corruptions', '?')} corruptions"
    except ValueError:
        detail = _qemu_said(p)
    raise ImageRefused(f"{path}: damaged {fmt} image ({detail}; see qemu-img check)")


def create(path: Path, fmt: str, size: int, cluster_size: int = 0) -> None:
    """A new, empty image of ``size`` virtual bytes (qcow2 with the source's cluster size when known)."""
    opts = ["-o", f"cluster_size={cluster_size}"] if fmt == "qcow2" and cluster_size else []
    p = _qemu_img(["create", "-q", "-f", fmt, *opts, str(path), str(size)], path)
    if p.returncode != 0:
        raise ImageError(f"{path}: cannot create a {fmt} image: {_qemu_said(p)}")


def resize(path: Path, fmt: str, size: int) -> None:
    """Grow or shrink the virtual size of a (closed) image."""
    p = _qemu_img(["resize", "-q", "-f", fmt, "--shrink", str(path), str(size)], path)
    if p.returncode != 0:
        raise ImageError(f"{path}: cannot resize to {size} bytes: {_qemu_said(p)}")


def add_bitmap(path: Path, name: str) -> None:
    """Start a persistent dirty bitmap in a (closed) qcow2: from now on its writes are tracked."""
    p = _qemu_img(["bitmap", "-f", "qcow2", "--add", str(path), name], path)
    if p.returncode != 0:
        raise ImageError(f"{path}: cannot add the dirty bitmap {name}: {_qemu_said(p)}")


def remove_bitmap(path: Path, name: str) -> None:
    p = _qemu_img(["bitmap", "-f", "qcow2", "--remove", str(path), name], path)
    if p.returncode != 0:
        raise ImageError(f"{path}: cannot remove the dirty bitmap {name}: {_qemu_said(p)}")
